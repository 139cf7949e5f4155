"""Rolling-origin backtest: the whole pipeline at K cutoffs, metrics pooled over them.

`run_backtest(cfg, k, spacing_days)` is what `jobs/backtest.py` calls. The latest cutoff is
the configured one (or the end of the data minus one horizon, as a single run would pick); the
others go back `spacing_days` at a time. Each cutoff is an ordinary pipeline run with its own
run id (`<prefix>-cutoff-<date>`), so every model and baseline (the GBMs, BG/NBD +
Gamma-Gamma, the heuristic) is refitted on what was known at that cutoff. The first run
ingests; the others share its ingest output (`share_ingest`): the contract tables do not
depend on the cutoff, and re-reading them would only cost time.

Pooled numbers are the mean over cutoffs of each cutoff's metric, with a 95% bootstrap interval
that resamples customers (a customer seen at several cutoffs is drawn with all their rows):
`clvray.metrics.pooled_bootstrap`. Paired differences (every GBM against BG/NBD + Gamma-Gamma
and against the behavioural-only GBM, the text variants against behavioural as the text
lift) use the same resample for both models. Only the test customers' predictions reach the
driver, as in a single run's evaluation.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pandas as pd

from clvray import metrics
from clvray.config import Config
from clvray.evaluate import BEHAVIOURAL_MODEL, PREDICTIONS_FILE
from clvray.storage import Storage, join

log = logging.getLogger("clvray")

BGNBD_MODEL = "bgnbd_gamma_gamma"
VALUE_METRICS = {"normalized_gini": metrics.normalized_gini, "spearman": metrics.spearman}


def cutoffs_back(latest: pd.Timestamp, k: int, spacing_days: int) -> list[pd.Timestamp]:
    """`k` cutoffs, latest first, `spacing_days` apart."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if spacing_days < 1:
        raise ValueError(f"spacing_days must be at least 1, got {spacing_days}")
    return [latest - pd.Timedelta(days=i * spacing_days) for i in range(k)]


def share_ingest(storage: Storage, source_run_dir: str, run_dir: str) -> dict:
    """Make `source_run_dir`'s ingest output this run's (symbolic links on a local store,
    object copies on S3) with its stage marker, so the runner skips ingest here; returns its
    ingest counts. Both runs have the same data and ingest config, so the same fingerprint."""
    from pyarrow import fs as pafs

    from clvray.graph import MARKERS

    for folder in ("ingest", "rejects"):
        src, dst = join(source_run_dir, folder), join(run_dir, folder)
        if not storage.exists(src):
            continue
        fs, src_path = storage.filesystem(src)
        _, dst_path = storage.filesystem(dst)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            if not os.path.lexists(dst_path):
                os.symlink(src_path, dst_path)
        else:
            for f in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
                if f.type == pafs.FileType.File:
                    fs.copy_file(f.path, dst_path + f.path[len(src_path) :])
    marker = storage.read_json(join(source_run_dir, MARKERS, "ingest.json"))
    storage.write_json(join(run_dir, MARKERS, "ingest.json"), marker)
    return marker.get("counts", {})


def _read_frame(storage: Storage, run_dir: str) -> pd.DataFrame:
    return pd.read_parquet(
        io.BytesIO(storage.read_bytes(join(run_dir, "evaluate", PREDICTIONS_FILE)))
    )


def run_backtest(
    cfg: Config,
    k: int = 3,
    spacing_days: int | None = None,
    n_boot: int = 500,
    prefix: str | None = None,
    until: str | None = None,
) -> dict:
    """Run the pipeline at `k` cutoffs `spacing_days` apart (default: one horizon) and pool.

    Returns the backtest summary (also written to `<storage>/<prefix>/backtest.json`):
    `cutoffs`, `per_cutoff` metrics of every model, `pooled` metrics with intervals,
    `vs_bgnbd`, `vs_behavioural` and `text_lift` paired differences, value-model choices,
    population counts and interval coverage per segment. Cost: k pipeline runs less (k - 1)
    ingests; the bootstrap is `n_boot` x k metric evaluations per model on the driver.
    `until`: run each cutoff's pipeline only up to this stage (at least `evaluate`, whose
    predictions the pooling reads; `evaluate` skips the per-cutoff reports).
    """
    from clvray.pipeline import absolute_paths, connect_ray, run_pipeline

    spacing = spacing_days or cfg.features.horizon_days
    cfg = absolute_paths(cfg)
    connect_ray(cfg)
    prefix = prefix or cfg.run.run_id or f"backtest-{cfg.data.source}-{cfg.fingerprint()}"
    storage = Storage(cfg.s3.endpoint_url, cfg.s3.region)

    def at(cutoff: pd.Timestamp | None, run_id: str) -> Config:
        features = cfg.features.model_copy(
            update={"cutoff": None if cutoff is None else cutoff.date()}
        )
        run = cfg.run.model_copy(update={"run_id": run_id})
        return cfg.model_copy(update={"features": features, "run": run})

    latest = pd.Timestamp(cfg.features.cutoff, tz="UTC") if cfg.features.cutoff else None
    runs: list[dict] = []
    first_dir: str | None = None
    for i in range(k):
        if i == 0:
            # The latest cutoff's run ingests; it resolves the cutoff when none is configured.
            m = run_pipeline(at(latest, f"{prefix}-cutoff-0"), until=until)
            latest = pd.Timestamp(m["cutoff"])
            first_dir = m["run_dir"]
        else:
            cutoff = cutoffs_back(latest, i + 1, spacing)[-1]
            run_id = f"{prefix}-cutoff-{i}"
            m = run_pipeline(at(cutoff, run_id), until=until, ingest_from=first_dir)
        log.info("backtest cutoff %s done: %s", m["cutoff"], m["run_dir"])
        runs.append(m)
    summary = summarize([(m, _read_frame(storage, m["run_dir"])) for m in runs], n_boot=n_boot)
    summary.update(
        {
            "source": cfg.data.source,
            "k": k,
            "spacing_days": spacing,
            "horizon_days": cfg.features.horizon_days,
            "prefix": prefix,
        }
    )
    storage.write_json(join(cfg.run.storage, prefix, "backtest.json"), summary)
    return summary


def summarize(runs: list[tuple[dict, pd.DataFrame]], n_boot: int = 500, seed: int = 0) -> dict:
    """Per-cutoff and pooled metrics from each cutoff's metrics.json and test predictions."""
    frames = [f for _, f in runs]
    ids = pd.concat([f["customer_id"] for f in frames], ignore_index=True)
    codes_all, _ = pd.factorize(ids, sort=True)
    codes, start = [], 0
    for f in frames:
        codes.append(codes_all[start : start + len(f)])
        start += len(f)
    models = [
        c.removeprefix("pred_value__")
        for c in frames[0].columns
        if c.startswith("pred_value__") and all(c in f for f in frames)
    ]

    def parts(model: str, other: str | None, kind: str = "value") -> list:
        col = "pred_value__" if kind == "value" else "pred_churn__"
        target = "future_value" if kind == "value" else "churned"
        return [
            (
                c,
                f[target].to_numpy(float),
                f[col + model].to_numpy(float),
                None if other is None else f[col + other].to_numpy(float),
            )
            for c, f in zip(codes, frames, strict=True)
        ]

    def has_churn(model: str) -> bool:
        return all(f"pred_churn__{model}" in f for f in frames)

    def boot(model: str, other: str | None, name: str) -> dict:
        if name == "churn_roc_auc":
            return metrics.pooled_bootstrap(
                parts(model, other, "churn"), metrics.roc_auc, n_boot, seed=seed
            )
        return metrics.pooled_bootstrap(parts(model, other), VALUE_METRICS[name], n_boot, seed=seed)

    per_cutoff = []
    for m, f in runs:
        row: dict = {
            "cutoff": m["cutoff"],
            "run_dir": m["run_dir"],
            "test_customers": len(f),
            "primary_model": m.get("primary_model"),
            "population": m.get("population", {}).get("by_reason"),
            "models": {},
        }
        for name in models:
            mm = m["models"].get(name, {})
            row["models"][name] = {
                "normalized_gini": mm.get("value", {}).get("normalized_gini"),
                "spearman": mm.get("value", {}).get("spearman"),
                "churn_roc_auc": mm.get("churn", {}).get("roc_auc"),
                "interval_coverage": mm.get("interval_coverage"),
                "value_model": (mm.get("value_model") or {}).get("chosen"),
                "value_model_reason": (mm.get("value_model") or {}).get("reason"),
            }
        if m.get("relbench_churn"):
            row["relbench_churn"] = m["relbench_churn"]
        per_cutoff.append(row)

    pooled: dict = {}
    for name in models:
        entry = {metric: boot(name, None, metric) for metric in VALUE_METRICS}
        if has_churn(name):
            entry["churn_roc_auc"] = boot(name, None, "churn_roc_auc")
        cov = _pooled_coverage(frames, name)
        if cov:
            entry.update(cov)
        pooled[name] = entry

    def versus(reference: str, names: list[str]) -> dict:
        out: dict = {}
        if reference not in models:
            return out
        for name in names:
            if name == reference or name not in models:
                continue
            d = {metric: boot(name, reference, metric) for metric in VALUE_METRICS}
            if has_churn(name) and has_churn(reference):
                d["churn_roc_auc"] = boot(name, reference, "churn_roc_auc")
            out[name] = d
        return out

    gbms = [n for n in models if n.startswith("gbm_")]
    text = [n for n in gbms if n.startswith("gbm_text") and "@" not in n]
    return {
        "cutoffs": [m["cutoff"] for m, _ in runs],
        "models": models,
        "n_boot": n_boot,
        "per_cutoff": per_cutoff,
        "pooled": pooled,
        "vs_bgnbd": versus(BGNBD_MODEL, gbms),
        "vs_behavioural": versus(BEHAVIOURAL_MODEL, [n for n in gbms if n not in text]),
        "text_lift": versus(BEHAVIOURAL_MODEL, text),
        "primary_models": sorted(
            {m.get("primary_model") for m, _ in runs if m.get("primary_model")}
        ),
    }


def _pooled_coverage(frames: list[pd.DataFrame], model: str) -> dict:
    """P10-P90 coverage pooled over cutoffs (every test row counts once) and per value segment
    (deciles of the model's prediction within each cutoff, then pooled)."""
    lo, hi = f"p10__{model}", f"p90__{model}"
    if not all(lo in f and hi in f for f in frames):
        return {}
    inside, segments = [], []
    for f in frames:
        y = f["future_value"].to_numpy(float)
        inside.append((y >= f[lo].to_numpy(float)) & (y <= f[hi].to_numpy(float)))
        segments.append(
            metrics.coverage_by_segment(
                y, f[lo].to_numpy(float), f[hi].to_numpy(float), f[f"pred_value__{model}"]
            )
        )
    by_segment = []
    for seg in sorted({r["segment"] for rows in segments for r in rows}):
        rows = [r for rs in segments for r in rs if r["segment"] == seg]
        n = sum(int(r["n"]) for r in rows)
        covered = sum(float(r["coverage"]) * int(r["n"]) for r in rows)
        by_segment.append({"segment": seg, "n": n, "coverage": covered / n})
    all_inside = np.concatenate(inside)
    return {
        "interval_coverage": float(all_inside.mean()),
        "interval_coverage_n": int(all_inside.size),
        "interval_coverage_by_segment": by_segment,
    }
