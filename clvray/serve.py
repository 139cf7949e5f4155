"""Real-time scoring with Ray Serve: one customer's history in, value / churn / segment out.

Three deployments, each scaled on its own (`autoscaling_config` from `ServeSettings`):

- `ReviewEmbedder`: the run's encoder with its head (`text.embed.ReviewEncoder`, the class the
  batch job's actor pool runs), one review per call, batched across requests by `@serve.batch`;
  CPU or GPU from the settings. Only deployed for a run whose model uses text.
- `CustomerScorer`: the run's boosters and fitted state (`model_run.ModelRun`), CPU.
- `ScoreAPI`: the FastAPI ingress: `POST /v1/score`, `POST /v1/score:batch`, `GET /healthz`,
  OpenAPI docs at `/docs`. It validates the request (pydantic, unknown fields refused, events
  at or after `as_of` refused, size limits), maps it to the data contract with the ingest rules
  (`contract.validate_*`), embeds the reviews and hands the frames to the scorer.

The scorer computes a customer's row with the batch job's functions (`ModelRun.score_history`:
`features.to_events` + `features.customer_features`, BG/NBD columns, text aggregates and the
fitted reduction, `score.Scorer`), so a customer gets the same score from both paths
(tests/test_serve.py compares them).

Run it: `serve run clvray.serve:build_app model_run=runs/<run-id>` on a laptop, or
`serve deploy deploy/serve.yaml` on a cluster. A model run that cannot be loaded fails the
application at start (`build_app` loads it before any deployment is created, and every
replica loads it again in its constructor).
"""

# No `from __future__ import annotations` here: FastAPI (through Serve's ingress) must see the
# request models as classes, or it reads `request: ScoreRequest` as a query parameter.
import asyncio
import datetime as dt
import math
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from clvray.contract import REASON, validate_reviews, validate_transactions
from clvray.model_run import ModelRun, load_model_run
from clvray.storage import Storage

API_VERSION = "v1"


# --- settings (the `args` of the Serve application) ----------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class EmbedderSettings(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    """> 0 puts the encoder on a GPU (bf16 where supported, as in the batch job)."""
    max_batch_size: int = Field(32, gt=0)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    autoscaling: Autoscaling = Autoscaling()


class ScorerSettings(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    autoscaling: Autoscaling = Autoscaling()


class Limits(_Strict):
    max_transactions: int = Field(10_000, gt=0)
    """Per customer."""
    max_reviews: int = Field(500, gt=0)
    """Per customer."""
    max_text_chars: int = Field(20_000, gt=0)
    """Per review; longer text is refused (the run's `ingest.max_text_chars` still truncates
    what is accepted, as ingest does)."""
    max_customers: int = Field(100, gt=0)
    """Per `/v1/score:batch` request."""


class ServeSettings(_Strict):
    model_run: str
    """Training run directory or `s3://` URI."""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_autoscaling: Autoscaling = Autoscaling()
    embedder: EmbedderSettings = EmbedderSettings()
    scorer: ScorerSettings = ScorerSettings()
    limits: Limits = Limits()

    def storage(self) -> Storage:
        return Storage(self.s3_endpoint_url, self.s3_region)


# --- request and response models -----------------------------------------------------------------


def _utc(value: dt.datetime) -> dt.datetime:
    """Naive times are UTC (as in the data contract)."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


UtcTime = Annotated[dt.datetime, AfterValidator(_utc)]


class Transaction(_Strict):
    order_id: str = Field(min_length=1)
    ts: UtcTime
    amount: float = Field(allow_inf_nan=False)
    """Negative for a refund or cancellation."""


class Review(_Strict):
    review_id: str = Field(min_length=1)
    ts: UtcTime
    text: str = ""
    rating: int | None = Field(None, ge=1, le=5)
    order_id: str | None = None
    product_id: str | None = None


class Customer(_Strict):
    customer_id: str = Field(min_length=1)
    transactions: list[Transaction] = Field(min_length=1)
    reviews: list[Review] = []
    attributes: dict[str, str | float | None] = {}
    """Customers-table attributes (e.g. `{"Country": "France"}`), categorical features."""

    @field_validator("customer_id")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


def _check_before(customer: Customer, as_of: dt.datetime, prefix: str) -> None:
    """Features use events strictly before `as_of`: anything else is a client error."""
    events: list[tuple[str, list[Transaction] | list[Review]]] = [
        ("transactions", customer.transactions),
        ("reviews", customer.reviews),
    ]
    for kind, rows in events:
        for i, e in enumerate(rows):
            ts: dt.datetime = e.ts  # type: ignore[union-attr,attr-defined]
            if ts >= as_of:
                raise ValueError(
                    f"{prefix}{kind}[{i}].ts: {ts.isoformat()} is not before as_of "
                    f"{as_of.isoformat()} (features use events strictly before as_of)"
                )
    ids = [r.review_id for r in customer.reviews]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{prefix}reviews: review_id values must be unique")


class ScoreRequest(Customer):
    as_of: UtcTime
    """Score as of this time (UTC when no zone is given)."""

    @model_validator(mode="after")
    def _events_before_as_of(self) -> "ScoreRequest":
        _check_before(self, self.as_of, "")
        return self


class BatchRequest(_Strict):
    as_of: UtcTime
    customers: list[Customer] = Field(min_length=1)

    @model_validator(mode="after")
    def _events_before_as_of(self) -> "BatchRequest":
        ids = [c.customer_id for c in self.customers]
        if len(set(ids)) != len(ids):
            raise ValueError("customers: customer_id values must be unique")
        for i, c in enumerate(self.customers):
            _check_before(c, self.as_of, f"customers[{i}].")
        return self


class Contribution(BaseModel):
    feature: str
    contribution: float
    """Signed SHAP contribution to the value model's margin (log scale for Tweedie)."""
    value: float | str | None
    """The customer's value of the feature (null when missing)."""


class CustomerScore(BaseModel):
    customer_id: str
    future_value_pred: float
    value_p10: float
    value_p50: float
    value_p90: float
    churn_prob: float
    value_segment: int
    top_features: list[Contribution]
    as_of: dt.datetime
    model_run: str
    model_variant: str
    clvray_version: str


class BatchResponse(BaseModel):
    scores: list[CustomerScore]


class Health(BaseModel):
    status: str
    model_run: str
    model_variant: str
    clvray_version: str
    text: bool


# --- deployments --------------------------------------------------------------------------------


class RunEncoder:
    """The run's encoder + head in this process: `embed(texts)` tokenizes and encodes like the
    batch job (`tokenize_table` + `ReviewEncoder`, the embedding actors' class) and returns
    (embedding, score) per text, in order."""

    def __init__(self, run: ModelRun, use_gpu: bool = False) -> None:
        from clvray.text.embed import ReviewEncoder, fixed_shapes
        from clvray.text.source import resolve_cached

        if run.text is None:
            raise ValueError(f"model run {run.uri} uses no text: no encoder to serve")
        self.model_path = resolve_cached(run.text.encoder, run.storage)
        self.max_length_tokens = run.cfg.text.max_length_tokens
        self.encoder = ReviewEncoder(
            self.model_path,
            run.storage,
            use_gpu=use_gpu,
            dtype=run.cfg.text.embed.dtype,
            fixed_shapes=fixed_shapes(run.cfg.text.embed),  # the batch job's shapes: same values
        )

    def embed(self, texts: list[str]) -> list[tuple[np.ndarray, float | None]]:
        import pyarrow as pa

        from clvray.text.features import embedding_matrix
        from clvray.text.tokens import tokenize_table

        n = len(texts)
        table = pa.table(
            {
                "customer_id": pa.array([""] * n, pa.string()),
                "review_id": pa.array([str(i) for i in range(n)], pa.string()),
                "ts": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
                "text": pa.array(texts, pa.string()),
            }
        )
        out = self.encoder(tokenize_table(table, self.model_path, self.max_length_tokens))
        # tokenize_table sorts by length: put the rows back in request order.
        order = np.argsort(np.asarray(out["review_id"].to_pylist(), dtype=np.int64))
        emb = embedding_matrix(out["embedding"])[order]
        scores = out["score"].to_numpy(zero_copy_only=False)[order]
        return [
            (emb[i], None if math.isnan(float(scores[i])) else float(scores[i])) for i in range(n)
        ]


def with_embeddings(
    reviews: pd.DataFrame, pairs: list[tuple[np.ndarray, float | None]]
) -> pd.DataFrame:
    """Review rows with the encoder's `embedding` and `score` columns (as `embed_reviews`)."""
    return reviews.assign(
        embedding=[p[0] for p in pairs],
        score=np.array([np.nan if p[1] is None else p[1] for p in pairs], "float32"),
    )


class ReviewEmbedder:
    """Deployment: `RunEncoder`, one review per call, calls from concurrent requests batched
    into one forward pass by `@serve.batch`."""

    def __init__(self, settings: dict) -> None:
        s = ServeSettings.model_validate(settings)
        self.encoder = RunEncoder(load_model_run(s.model_run, s.storage()), s.embedder.num_gpus > 0)
        batched: Any = self.embed  # @serve.batch adds these setters to the method
        batched.set_max_batch_size(s.embedder.max_batch_size)
        batched.set_batch_wait_timeout_s(s.embedder.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, float | None]]:
        return self.encoder.embed(texts)


class CustomerScorer:
    """The run's boosters and fitted state; scores contract-shaped frames of many customers."""

    def __init__(self, settings: dict) -> None:
        s = ServeSettings.model_validate(settings)
        self.run: ModelRun = load_model_run(s.model_run, s.storage())

    def score(
        self,
        transactions: pd.DataFrame,
        reviews: pd.DataFrame | None,
        attributes: pd.DataFrame | None,
        as_of: dt.datetime,
    ) -> list[dict]:
        run = self.run
        scores, frame = run.score_history(transactions, reviews, as_of, attributes)
        return response_rows(scores, frame, run, as_of)

    def health(self) -> dict:
        return health_of(self.run)


def health_of(run: ModelRun) -> dict:
    return {
        "status": "ok",
        "model_run": run.uri,
        "model_variant": run.variant,
        "clvray_version": run.clvray_version,
        "text": run.text is not None,
    }


def _plain(v: Any) -> float | str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return None if math.isnan(f) else f
    return str(v)


def response_rows(
    scores: pd.DataFrame, frame: pd.DataFrame, run: ModelRun, as_of: dt.datetime
) -> list[dict]:
    """One response dict per scored customer: predictions, segment and the top contributing
    features with the customer's value of each."""
    k = run.cfg.score.top_contributions
    rows = []
    for i, s in enumerate(scores.to_dict("records")):
        top = [
            {
                "feature": s[f"top_feature_{j}"],
                "contribution": float(s[f"top_contrib_{j}"]),
                "value": _plain(frame.at[i, s[f"top_feature_{j}"]]),
            }
            for j in range(1, k + 1)
        ]
        rows.append(
            {
                "customer_id": s["customer_id"],
                "future_value_pred": float(s["future_value_pred"]),
                "value_p10": float(s["value_p10"]),
                "value_p50": float(s["value_p50"]),
                "value_p90": float(s["value_p90"]),
                "churn_prob": float(s["churn_prob"]),
                "value_segment": int(s["value_segment"]),
                "top_features": top,
                "as_of": as_of,
                "model_run": run.uri,
                "model_variant": run.variant,
                "clvray_version": run.clvray_version,
            }
        )
    return rows


def contract_frames(
    customers: list[Customer], max_text_chars: int
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Request customers as contract-shaped frames, through the ingest row rules (a row the
    rules reject is a 422 naming the field)."""
    tx = pd.DataFrame(
        [
            {"customer_id": c.customer_id, "order_id": t.order_id, "ts": t.ts, "amount": t.amount}
            for c in customers
            for t in c.transactions
        ]
    )
    tx = _accepted(validate_transactions(tx), "transactions")
    rv_rows = [
        {"customer_id": c.customer_id, **r.model_dump()} for c in customers for r in c.reviews
    ]
    reviews = None
    if rv_rows:
        rv = pd.DataFrame(rv_rows)
        rv["rating"] = rv["rating"].astype("float64")
        reviews = _accepted(validate_reviews(rv, max_text_chars), "reviews")
    attr_rows = [{"customer_id": c.customer_id, **c.attributes} for c in customers if c.attributes]
    attributes = pd.DataFrame(attr_rows) if attr_rows else None
    if attributes is not None:
        # Attributes are strings in the customers table (ingest); so are they here.
        for col in attributes.columns[1:]:
            attributes[col] = attributes[col].map(lambda v: None if v is None else _attr(v))
    return tx, reviews, attributes


def _attr(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _accepted(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    bad = frame[REASON].notna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HTTPException(422, detail=f"{table}[{i}]: {frame[REASON].iloc[i]}")
    return frame.drop(columns=[REASON, "_raw"])


app = FastAPI(
    title="clvray scoring",
    description="Customer lifetime value, value interval, churn risk and value segment from a "
    "trained clvray model run, computed with the batch job's feature functions.",
    version=API_VERSION,
)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the client; the replica's log has it.
    return JSONResponse(
        status_code=500, content={"detail": f"internal error: {type(exc).__name__}"}
    )


@serve.deployment
@serve.ingress(app)
class ScoreAPI:
    def __init__(self, settings: dict, scorer: Any, embedder: Any | None) -> None:
        s = ServeSettings.model_validate(settings)
        self.limits = s.limits
        self.run = load_model_run(s.model_run, s.storage())
        self.max_text_chars = self.run.cfg.ingest.max_text_chars
        self.scorer = scorer
        self.embedder = embedder

    def _check_limits(self, customers: list[Customer], prefix: str) -> None:
        lim = self.limits
        for i, c in enumerate(customers):
            where = prefix.format(i=i)
            if len(c.transactions) > lim.max_transactions:
                raise HTTPException(
                    413,
                    detail=f"{where}transactions: {len(c.transactions)} events, the limit is "
                    f"{lim.max_transactions}",
                )
            if len(c.reviews) > lim.max_reviews:
                raise HTTPException(
                    413, detail=f"{where}reviews: {len(c.reviews)} reviews, the limit is "
                    f"{lim.max_reviews}"
                )  # fmt: skip
            for j, r in enumerate(c.reviews):
                if len(r.text) > lim.max_text_chars:
                    raise HTTPException(
                        413,
                        detail=f"{where}reviews[{j}].text: {len(r.text)} characters, the "
                        f"limit is {lim.max_text_chars}",
                    )

    async def _score(self, customers: list[Customer], as_of: dt.datetime) -> list[dict]:
        tx, reviews, attributes = contract_frames(customers, self.max_text_chars)
        if reviews is not None and self.embedder is not None:
            pairs = await asyncio.gather(*[self.embedder.embed.remote(t) for t in reviews["text"]])
            reviews = with_embeddings(reviews, list(pairs))
        rows = await self.scorer.score.remote(tx, reviews, attributes, as_of)
        scored = {r["customer_id"] for r in rows}
        missing = [i for i, c in enumerate(customers) if c.customer_id not in scored]
        if missing:
            raise HTTPException(
                422,
                detail=f"customer {customers[missing[0]].customer_id!r}: no order with a positive "
                "value before as_of (the model scores customers with at least one purchase)",
            )
        return rows

    @app.post("/v1/score", response_model=CustomerScore)
    async def score(self, request: ScoreRequest) -> dict:
        """Score one customer from their transactions, reviews and attributes as of `as_of`."""
        self._check_limits([request], "")
        return (await self._score([request], request.as_of))[0]

    @app.post("/v1/score:batch", response_model=BatchResponse)
    async def score_batch(self, request: BatchRequest) -> dict:
        """Score many customers as of one `as_of` (answers in request order)."""
        if len(request.customers) > self.limits.max_customers:
            raise HTTPException(
                413,
                detail=f"customers: {len(request.customers)} customers, the limit is "
                f"{self.limits.max_customers}",
            )
        self._check_limits(request.customers, "customers[{i}].")
        rows = {r["customer_id"]: r for r in await self._score(request.customers, request.as_of)}
        return {"scores": [rows[c.customer_id] for c in request.customers]}

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return await self.scorer.health.remote()


def _options(num_cpus: float, autoscaling: Autoscaling, num_gpus: float = 0.0) -> dict:
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    return {"ray_actor_options": actor, "autoscaling_config": autoscaling.model_dump()}


def build_app(args: dict) -> Any:
    """The Serve application for `args` (`ServeSettings`; `serve run clvray.serve:build_app
    model_run=<uri>` or the `args` of deploy/serve.yaml). Loads the model run first, so a run
    that is incomplete or incompatible fails here, naming the file, before any replica starts."""
    s = ServeSettings.model_validate(args)
    run = load_model_run(s.model_run, s.storage())
    settings = s.model_dump()
    # serve.deployment(cls) returns a Deployment; its stubs type it as a decorator factory.
    scorer_deployment: Any = serve.deployment(CustomerScorer)
    scorer = scorer_deployment.options(
        name="CustomerScorer", **_options(s.scorer.num_cpus, s.scorer.autoscaling)
    ).bind(settings)
    embedder = None
    if run.text is not None:
        e = s.embedder
        embedder_deployment: Any = serve.deployment(ReviewEmbedder)
        embedder = embedder_deployment.options(
            name="ReviewEmbedder", **_options(e.num_cpus, e.autoscaling, num_gpus=e.num_gpus)
        ).bind(settings)
    ingress: Any = ScoreAPI
    return ingress.options(**_options(s.ingress_num_cpus, s.ingress_autoscaling)).bind(
        settings, scorer, embedder
    )
