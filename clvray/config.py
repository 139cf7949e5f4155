"""Typed configuration: one pydantic model per stage, defaults in code, YAML on top, CLI last.

`load_config(path, overrides)` is the only way a job builds its config. Unknown keys and wrong
types raise `ConfigError` naming the dotted key, so a typo in a YAML file or a `--set` fails
before any Ray work starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class _Loader(yaml.SafeLoader):
    """YAML without its implicit timestamps: `2023-13-01` stays text, so the date field's own
    validation reports it with the dotted key instead of a bare error from the YAML parser."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class _Strict(BaseModel):
    # strict: `horizon_days: true` is not 1 and `max_depth: "3"` is not 3; an int is still a
    # valid float, and YAML dates (unquoted 2023-05-01) are dates.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class RunSection(_Strict):
    storage: str = "runs"
    """Root of all runs: a local folder or `s3://bucket/prefix` shared by every node."""
    run_id: str | None = None
    """Folder name under `storage`; default: a hash of the resolved config (re-runs reuse it)."""
    seed: int = 0


class S3Section(_Strict):
    endpoint_url: str | None = None
    """For S3-compatible stores (MinIO, moto). Credentials come from the AWS environment."""
    region: str | None = None


class RaySection(_Strict):
    address: str | None = None
    """None: connect to `RAY_ADDRESS` if set (ray job submit), else start a local Ray."""
    num_cpus: int | None = None
    object_store_memory_mb: int | None = None
    autoscaling: bool = False
    """The cluster adds nodes on demand: skip the check that worker and actor counts fit the
    resources present at start (`clvray.resources`)."""

    shared_local_storage: bool = False
    """True: a local `run.storage` is seen by every node (one machine, or a shared file system
    mounted at the same path), so it is allowed on a cluster and under `ray job submit`."""


class SyntheticSection(_Strict):
    n_customers: int = Field(2000, gt=0)
    start: dt.date = Field(dt.date(2022, 1, 1), strict=False)
    end: dt.date = Field(dt.date(2024, 1, 1), strict=False)
    n_products: int = Field(40, gt=0)
    customers_per_task: int = Field(5000, gt=0)
    """Each Ray task generates this many customers; tasks run in parallel across nodes."""
    review_prob: float = Field(0.35, ge=0, le=1)
    """Probability that a purchase is followed by a review."""
    seed: int = 7


class DataSection(_Strict):
    source: Literal["synthetic", "contract_parquet", "amazon_reviews_json", "online_retail_csv"] = (
        "synthetic"
    )
    transactions: str | None = None
    reviews: str | None = None
    customers: str | None = None
    """`customer_id` plus attribute columns (CSV, parquet or JSON lines; file or folder). With
    `online_retail_csv` and no file here, the table is derived from the transactions CSV
    (each customer's most frequent `Country`)."""
    customer_attributes: list[str] | None = None
    """Attribute columns of the customers table used as categorical features; None: all."""
    synthetic: SyntheticSection = SyntheticSection()


class IngestSection(_Strict):
    max_reject_share: float = Field(0.05, ge=0, le=1)
    """Stop the run when more than this share of any table's rows is rejected."""
    max_text_chars: int = Field(2000, gt=0)
    """Review text is cut to this many characters in the read task, before any shuffle."""
    min_ts: dt.date = Field(dt.date(1990, 1, 1), strict=False)
    """Rows with `ts` before this day are rejected (`ts: outside ...`)."""
    max_ts: dt.date | None = Field(None, strict=False)
    """Rows with `ts` after this day are rejected; None: today + 1 day (UTC). The default
    cutoff is taken from accepted rows only, so one row in the year 2100 cannot move it."""
    max_abs_amount: float = Field(1e9, gt=0)
    """Rows with `|amount|` above this are rejected: sums of accepted amounts stay finite."""
    epoch_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"
    """Unit of numeric timestamps; `auto`: by magnitude (< 1e11 s, < 1e14 ms, < 1e17 us)."""
    date_format: Literal["auto", "dd/mm/yyyy", "mm/dd/yyyy"] = "auto"
    """Order of slash dates (`01/12/2010`), one per file; `auto`: detected from the whole
    column (a first field above 12 means day first, a second above 12 month first,
    neither: month first; both: every slash date of the file rejected with the reason)."""
    on_bad_file: Literal["stop", "skip"] = "stop"
    """A truncated / corrupt file, or one whose schema differs from its siblings: `stop` the
    run naming it, or `skip` it (counted as one rejected input with the reason)."""
    block_rows: int = Field(250_000, gt=0)
    """Rows per read task (parquet row groups are grouped up to this); every file is at least
    one task, so a few small files still become several blocks."""

    @model_validator(mode="after")
    def _range(self) -> IngestSection:
        if self.max_ts is not None and self.max_ts <= self.min_ts:
            raise ValueError(
                f"max_ts {self.max_ts} must be after min_ts {self.min_ts} (ingest.min_ts)"
            )
        return self


class PrivacySection(_Strict):
    scrub_text: bool = True
    """Replace e-mail addresses, URLs, card-like digit runs and phone numbers in review text
    by `<email>`, `<url>`, `<card>`, `<phone>` at ingest, before anything stores, fine-tunes
    on, embeds or names topics from the text."""
    pseudonymize_ids: bool = False
    """Replace customer, order and review ids by an HMAC-SHA256 under the key in the
    environment variable `id_key_env` at ingest: no output holds a raw id."""
    id_key_env: str = "CLVRAY_ID_KEY"
    """Name of the environment variable holding the HMAC key (the key is never written)."""


class FeaturesSection(_Strict):
    cutoff: dt.date | None = Field(None, strict=False)
    """Features use `ts < cutoff`, labels `[cutoff, cutoff + horizon)`. None: end of data minus horizon."""
    horizon_days: int = Field(90, gt=0)
    valid_share: float = Field(0.15, gt=0, lt=1)
    test_share: float = Field(0.2, gt=0, lt=1)
    num_partitions: int = Field(8, gt=0)
    """Customer buckets of the features stage (at least; see `rows_per_partition`) and hash
    partitions of the joins by customer."""
    rows_per_partition: int = Field(1_000_000, gt=0)
    """Events per customer bucket: more rows, more buckets, so a task's memory stays bounded."""
    btyd_features: bool = True
    """Give the GBMs the train-fitted BG/NBD + Gamma-Gamma predictions (P(alive), expected
    purchases and value over the horizon) as features (`clvray.btyd`)."""

    @model_validator(mode="after")
    def _shares(self) -> FeaturesSection:
        if self.valid_share + self.test_share >= 1:
            raise ValueError("valid_share + test_share must be below 1")
        return self


class FinetuneSection(_Strict):
    enabled: bool = True
    target: Literal["rating", "churn"] = "churn"
    """`churn`: the train customers' churn labels (valid/test customers' reviews never train the
    head); `rating`: the review's stars (every review, no label leakage possible). Churn is the
    default: it measured better on the demo data (README, "Choosing the text defaults")."""
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_reviews: int | None = Field(3000, gt=0)
    """Cap on training reviews (a sample); None uses every review before the cutoff."""
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    checkpoints_to_keep: int = Field(2, gt=0)
    """Newest epoch checkpoints kept under the run's storage (each holds optimizer state too)."""
    grad_clip_norm: float = Field(1.0, gt=0)
    seed: int = 0


class EmbedSection(_Strict):
    batch_size: int = Field(64, gt=0)
    """Reviews per encoder call: 32-64 suits CPUs, 256+ a GPU (bf16)."""
    min_actors: int = Field(1, gt=0)
    max_actors: int | None = Field(None, gt=0)
    """None: as many as fit beside the feeding tasks (`clvray.resources.embed_actors`): the
    GPUs / `num_gpus_per_actor`, or (CPUs - 1) / `cpus_per_actor` on a CPU cluster."""
    num_gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, gt=0)
    """Torch threads per actor. None: the CPUs the actor holds, or on a one-node CPU cluster
    the node's CPUs shared among the actors (Ray would otherwise set one thread per CPU held,
    and the feeder's CPU would idle while the model runs)."""
    dtype: Literal["float16", "float32"] = "float32"
    fixed_shapes: bool = True
    """Encoder calls of one shape per length bucket: `micro_batch` rows (padded with blank
    rows) by the review's token count rounded up to `length_bucket`. A review's embedding then
    does not depend on which reviews share its batch (that changes with Ray's block layout):
    same reviews, bitwise the same embeddings and scores, in the batch job and in Serve. False:
    one call per batch padded to its longest review, embeddings that vary by ~1e-6 run to run."""
    micro_batch: int = Field(16, gt=0)
    length_bucket: int = Field(16, gt=0)
    reduce: Literal["none", "pca", "random"] = "pca"
    reduce_dim: int = Field(4, gt=0)
    """Dimensions kept of each mean embedding. With ~1,300 train customers 4 beat 8 and 16
    (more dimensions gave XGBoost more noise to split on); raise it with more customers."""
    recency_half_life_days: float = Field(90.0, gt=0)
    tokenize_cpus: float = Field(0.25, gt=0)
    """CPUs each tokenization task asks for (fast tokenizers cost a few percent of encoding).
    Must differ from `cpus_per_actor`: equal resources make Ray fuse tokenization into the
    actors."""
    tokenize_batch_size: int = Field(1024, gt=0)
    """Rows per CPU tokenization task; rows are sorted by length inside it, so the model batches
    cut from it carry little padding."""
    reduce_fit_rows: int = Field(50_000, gt=0)
    """At most this many train customers (a hash sample) go to the driver to fit the reduction."""
    reduce_seed: int = 0

    @model_validator(mode="after")
    def _tokenize_apart(self) -> EmbedSection:
        if self.tokenize_cpus == self.cpus_per_actor and self.num_gpus_per_actor == 0:
            raise ValueError(
                "tokenize_cpus must differ from cpus_per_actor (equal resources make Ray fuse "
                "tokenization into the encoder actors)"
            )
        return self


class TopicsSection(_Strict):
    enabled: bool = True
    n_topics: int = Field(8, ge=2)
    fit_rows: int = Field(20_000, gt=0)
    """At most this many reviews (a hash sample) go to the driver to fit the k-means."""
    top_words: int = Field(8, gt=0)
    min_word_count: int = Field(3, gt=0)
    """Words seen fewer times in all reviews are not used to name topics."""
    as_features: bool = False
    """Add each customer's topic shares to the primary text model's features."""
    seed: int = 0


class TextSection(_Strict):
    enabled: bool = True
    model: str = "packaged:all-MiniLM-L6-v2"
    """Local directory, `s3://` prefix, hub id (clusters with internet) or `packaged:all-MiniLM-L6-v2`."""
    max_length_tokens: int = Field(128, gt=0)
    num_partitions: int = Field(8, gt=0)
    """Hash partitions of the text path's customer shuffles (label join, per-customer features)."""
    pretrained_variant: bool = True
    """Also fit `gbm_text_pretrained` (the encoder before fine-tuning) as an ablation beside
    `gbm_text_finetuned`: it costs one more embedding pass and model. Off: the fine-tuned
    variant alone (with fine-tuning off, the pretrained one is the text model regardless)."""
    finetune: FinetuneSection = FinetuneSection()
    embed: EmbedSection = EmbedSection()
    topics: TopicsSection = TopicsSection()


class TrainSection(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    num_boost_round: int = Field(300, gt=0)
    early_stopping_rounds: int = Field(30, gt=0)
    max_depth: int = Field(5, gt=0)
    eta: float = Field(0.05, gt=0)
    subsample: float = Field(0.9, gt=0, le=1)
    """Share of train customers each boosting round of the value, churn and spend boosters
    sees. The draw is a hash of the customer id, the seed and the round (not XGBoost's own
    per-worker sampler), so the model does not depend on how customers are spread over
    workers."""
    sample_customers: int = Field(200_000, gt=0)
    """Train and valid customers (a stable hash sample; all of them below this) behind the
    global bin edges, the boosters' starting values and the quantile (interval) booster, which
    is fitted in one process: XGBoost's distributed quantile leaves average per-worker
    quantiles, so a multi-worker fit would depend on the number of workers."""
    value_objective: Literal["reg:tweedie", "reg:squarederror", "reg:pseudohubererror"] = (
        "reg:tweedie"
    )
    tweedie_variance_power: float = Field(1.3, gt=1, lt=2)
    quantiles: list[float] = [0.1, 0.5, 0.9]
    max_failures: int = Field(1, ge=0)
    """Times Ray Train restarts the worker group after a worker failure (its FailureConfig)."""

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, quantiles: list[float]) -> list[float]:
        outside = [q for q in quantiles if not 0 < q < 1]
        if outside:
            raise ValueError(f"quantiles must lie inside (0, 1); got {outside}")
        return quantiles

    value_model: Literal["tweedie", "hurdle", "blend", "auto"] = "auto"
    """`tweedie`: one booster on future value (`value_objective`); `hurdle`: P(any purchase in
    the horizon) (the churn booster) times E[value | purchase] (a booster fitted on buyers
    only, `spend_objective`); `blend`: geometric mean of the hurdle value and the train-fitted
    BG/NBD + Gamma-Gamma expected value (needs `features.btyd_features`); `auto`: every one of
    them that can be built, keeping the one with the higher normalized Gini + Spearman on the
    valid split (the reason is saved in meta.json and metrics.json)."""
    spend_objective: Literal["reg:gamma", "reg:tweedie", "reg:squarederror"] = "reg:gamma"
    """Objective of the hurdle model's conditional part (buyers' future value, log link for
    gamma / tweedie; buyers' net values below `SPEND_FLOOR` are raised to it)."""
    conformal: bool = True
    """Conformalise the outer quantiles on the valid split (CQR, per group of predicted value),
    so the P10-P90 interval covers 80% of customers in each group, not only on average."""
    conformal_groups: int = Field(10, gt=0)
    """Groups of predicted value calibrated separately (fewer when the valid split has under
    `MIN_CONFORMAL_GROUP` customers per group)."""


class ScoreSection(_Strict):
    batch_size: int = Field(4096, gt=0)
    n_segments: int = Field(10, gt=1)
    top_contributions: int = Field(3, ge=0)
    max_actors: int = Field(2, gt=0)
    """Scoring actors (each loads the boosters once)."""
    cpus_per_actor: float = Field(1.0, gt=0)
    edge_sample_rows: int = Field(200_000, gt=0)
    """At most this many scored train customers (a hash sample) place the segment edges."""


class EvaluateSection(_Strict):
    max_customers: int = Field(2_000_000, gt=0)
    """At most this many test customers (a hash sample) reach the driver for the metrics."""
    report_sample_rows: int = Field(2000, gt=0)
    """Scored customers sampled into the report's tables and plots."""


class TrackingSection(_Strict):
    mlflow_uri: str | None = None
    """MLflow tracking URI (`http://host:5000`, `databricks`, ...); None: no MLflow run. A
    `file://` store also needs `MLFLOW_ALLOW_FILE_STORE=true` with MLflow 3."""
    experiment: str = "clvray"


class Config(_Strict):
    run: RunSection = RunSection()
    s3: S3Section = S3Section()
    ray: RaySection = RaySection()
    data: DataSection = DataSection()
    ingest: IngestSection = IngestSection()
    privacy: PrivacySection = PrivacySection()
    features: FeaturesSection = FeaturesSection()
    text: TextSection = TextSection()
    train: TrainSection = TrainSection()
    score: ScoreSection = ScoreSection()
    evaluate: EvaluateSection = EvaluateSection()
    tracking: TrackingSection = TrackingSection()

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they go or which Ray runs them)."""
        payload = self.model_dump(
            mode="json", exclude={"run": {"storage", "run_id"}, "ray": True, "tracking": True}
        )
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        """The resolved config as written next to every output: credentials in URLs (user
        info, `token=` / `key=` / `secret=` / `password=` query values) are redacted."""
        return yaml.safe_dump(redact(self.model_dump(mode="json")), sort_keys=False)


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_URL_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:token|key|secret|password|passwd|sig|signature|access_token)=)[^&\s]+"
)


def redact(obj: Any) -> Any:
    """`obj` (a config dump) with credentials in URL strings replaced by `***`."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_SECRET_PARAM.sub(r"\1***", _URL_USERINFO.sub("***@", obj))
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    # YAML parsing gives ints, floats, bools, nulls and lists from the command line.
    return key.strip().split("."), _yaml(raw) if raw != "" else ""


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown config key {key!r}")
        else:
            lines.append(f"{source}: config key {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def add_config_options(
    parser: argparse.ArgumentParser,
    storage_help: str = "run storage root: a folder or s3://bucket/prefix",
    run_id_help: str | None = "run folder name (default: hash of the data)",
    set_example: str = "features.horizon_days=60",
) -> None:
    """The options every job shares: `--config`, `--storage`, `--run-id` (unless
    `run_id_help` is None) and repeatable `--set KEY=VALUE`; `config_from_args` reads them."""
    parser.add_argument(
        "--config", default=None, help="YAML config (defaults in code when omitted)"
    )
    parser.add_argument("--storage", default=None, help=storage_help)
    if run_id_help is not None:
        parser.add_argument("--run-id", default=None, help=run_id_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {set_example} (repeatable)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    """`load_config` for the options of `add_config_options` (`--storage` and `--run-id` are
    `run.storage` and `run.run_id`, applied after every `--set`)."""
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"run.storage={args.storage}")
    if getattr(args, "run_id", None):
        overrides.append(f"run.run_id={args.run_id}")
    return load_config(args.config, overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from code defaults, then the YAML file at `path`, then `overrides`.

    Raises ConfigError naming the file and dotted key of any unknown key or wrong value.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = _yaml(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value)
        source = f"{source} + --set" if "--set" not in source else source
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
