"""Using a trained model: the loader, batch scoring of a snapshot (jobs/score.py) and the Ray
Serve app over real HTTP, all from ONE tiny trained run with the text path (tiny BERT,
fine-tuned, topic shares as features) built once for this module.

The skew test scores the same customers through both paths and requires equal answers.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.slow]

AS_OF = "2023-12-01"
SERVE_LIMITS = {"max_reviews": 40, "max_text_chars": 3000, "max_customers": 8}


@pytest.fixture(scope="module")
def trained_run(text_run):
    """(run directory, storage root) of the session's small text run (tests/conftest.py):
    fine-tuned tiny BERT, topic shares and BG/NBD columns as features."""
    run_dir, storage, _ = text_run
    return run_dir, storage


@pytest.fixture(scope="module")
def snapshot_argv(trained_run):
    """jobs/score.py options pointing at the synthetic data as a contract_parquet snapshot."""
    _, storage = trained_run
    (data,) = list((storage / "_synthetic").iterdir())
    return [
        "--set", "data.source=contract_parquet",
        "--set", f"data.transactions={data / 'transactions'}",
        "--set", f"data.reviews={data / 'reviews'}",
        "--set", "features.num_partitions=2",
        "--set", "text.num_partitions=2",
        "--set", "text.embed.max_actors=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def batch_scores(trained_run, snapshot_argv, tmp_path_factory) -> dict:
    """The summary of one scoring of the snapshot at AS_OF (seed 7, the training run's is 0:
    tests/test_job_submit.py checks that another seed reproduces the training scores)."""
    import jobs.score as job

    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("scoring")
    argv = [
        "--model-run", str(run_dir), "--as-of", AS_OF,
        "--storage", str(out), "--run-id", "seed-7",
        "--set", "run.seed=7", *snapshot_argv,
    ]  # fmt: skip
    assert job.main(argv) == 0
    return json.loads((out / "seed-7" / "score.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(trained_run):
    """The Serve app from the trained run on a free local port; shut down after the module."""
    from ray import serve

    from clvray.serve import build_app

    run_dir, _ = trained_run
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    app = build_app(
        {
            "model_run": str(run_dir),
            "ingress_num_cpus": 0.1,
            "embedder": {**small, "max_batch_size": 16},
            "scorer": small,
            "limits": SERVE_LIMITS,
        }
    )
    serve.run(app, name="clvray", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _history(score_dir, customer_ids: list[str], as_of: str) -> list[dict]:
    """The customers' accepted rows of the scored snapshot before as_of, as request bodies."""
    cutoff = pd.Timestamp(as_of, tz="UTC")
    tx = pd.read_parquet(score_dir / "ingest" / "transactions")
    rv = pd.read_parquet(score_dir / "ingest" / "reviews")
    tx, rv = tx[tx["ts"] < cutoff], rv[rv["ts"] < cutoff]
    bodies = []
    for cid in customer_ids:
        t = tx[tx["customer_id"] == cid]
        r = rv[rv["customer_id"] == cid]
        bodies.append(
            {
                "customer_id": cid,
                "transactions": [
                    {"order_id": o, "ts": ts.isoformat(), "amount": float(a)}
                    for o, ts, a in zip(t["order_id"], t["ts"], t["amount"], strict=True)
                ],
                "reviews": [
                    {
                        "review_id": row.review_id,
                        "ts": row.ts.isoformat(),
                        "text": row.text,
                        "rating": None if pd.isna(row.rating) else int(row.rating),
                    }
                    for row in r.itertuples()
                ],
            }
        )
    return bodies


# --- the loader -----------------------------------------------------------------------------------


def _copy_run(run_dir, dest):
    shutil.copytree(
        run_dir, dest, ignore=shutil.ignore_patterns("ray_train", "rejects", "report", "ingest")
    )
    return dest


def test_loader_holds_every_fitted_thing(trained_run):
    from clvray.model_run import load_model_run
    from clvray.train import MODEL_FORMAT

    run_dir, _ = trained_run
    run = load_model_run(str(run_dir))
    assert run.variant == "gbm_text_finetuned"
    assert run.meta["model_format"] == MODEL_FORMAT
    assert "topic_share_0" in run.features and "btyd_p_alive" in run.features
    assert run.btyd_fit is not None and run.text is not None
    assert run.text.centroids.shape[0] == 3
    assert run.text.encoder.endswith("/model") and "text/finetune" in run.text.encoder
    assert len(run.scorer.edges) == run.cfg.score.n_segments - 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "scores/gbm_text_finetuned/_segments.json").unlink(), "_segments.json"),
        (lambda d: (d / "btyd/btyd.json").unlink(), "btyd.json"),
        (lambda d: (d / "text/topics/centroids.npz").unlink(), "centroids.npz"),
        (lambda d: (d / "evaluate/metrics.json").unlink(), r"evaluate/metrics.json"),
        (lambda d: _edit_meta(d, model_format=0), "meta.json has model_format 0"),
        (
            lambda d: _edit_meta(d, behavioural_features=["frequency"]),
            "meta.json was trained on another behavioural feature set",
        ),
        (lambda d: _edit_meta(d, features=["frequency", "sentiment_x"]), "sentiment_x"),
        (
            lambda d: (d / "config.yaml").write_text("features:\n  horizon: 3\n"),
            "config.yaml does not match",
        ),
    ],
)
def test_loader_refuses_incomplete_or_incompatible_runs(trained_run, tmp_path, damage, message):
    from clvray.model_run import ModelRunError, load_model_run

    run_dir, _ = trained_run
    copy = _copy_run(run_dir, tmp_path / "run")
    load_model_run(str(copy))  # the intact copy loads
    damage(copy)
    with pytest.raises(ModelRunError, match=message):
        load_model_run(str(copy))


def _edit_meta(run_dir, **changes):
    path = run_dir / "models/gbm_text_finetuned/meta.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_unloadable_run_fails_the_app_at_build(tmp_path):
    from clvray.model_run import ModelRunError
    from clvray.serve import build_app

    with pytest.raises(ModelRunError, match="does not exist"):
        build_app({"model_run": str(tmp_path / "nope")})
    with pytest.raises(Exception, match="model_runn"):
        build_app({"model_runn": "x"})


# --- batch scoring -------------------------------------------------------------------------------


def test_score_job_writes_training_columns_plus_provenance(trained_run, batch_scores):
    from clvray.model_run import PROVENANCE

    run_dir, _ = trained_run
    summary = batch_scores
    scores = pd.read_parquet(summary["scores"])
    trained = pd.read_parquet(run_dir / "scores" / "gbm_text_finetuned")
    # the training run's score columns, less the labels it was evaluated on
    expected = [c for c in trained.columns if c not in ("future_value", "churned")]
    assert sorted(scores.columns) == sorted(expected + PROVENANCE)
    assert (scores["model_run"] == str(run_dir)).all()
    assert (scores["as_of"] == pd.Timestamp(AS_OF, tz="UTC")).all()
    assert scores["customer_id"].is_unique and len(scores) == summary["customers_scored"] > 0
    # no labels in the scored features; counts add up at ingest
    tx = summary["counts"]["transactions"]
    assert tx["rows_in"] == tx["rows_accepted"] + tx["rows_rejected"]
    # a later as-of than training sees more history: scores differ from the training run's
    both = scores.merge(trained, on="customer_id", suffixes=("", "_train"))
    assert len(both) > 0
    assert not np.allclose(both["future_value_pred"], both["future_value_pred_train"])


def test_score_job_refuses_a_broken_run_naming_the_file(tmp_path, capsys):
    import jobs.score as job

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("run:\n  seed: 0\n")
    assert job.main(["--model-run", str(tmp_path / "run")]) == 2
    assert "evaluate/metrics.json is missing" in capsys.readouterr().err


# --- serving -------------------------------------------------------------------------------------


def test_serve_matches_batch_scores(serve_url, batch_scores):
    """No skew: the same customers through jobs/score.py and POST /v1/score(:batch)."""
    import httpx

    summary = batch_scores
    scores = pd.read_parquet(summary["scores"]).set_index("customer_id")
    score_dir = Path(summary["out"])
    rv = pd.read_parquet(score_dir / "ingest" / "reviews")
    with_reviews = sorted(set(scores.index) & set(rv["customer_id"]))[:3]
    without = sorted(set(scores.index) - set(rv["customer_id"]))[:1]
    ids = with_reviews + without
    assert len(with_reviews) == 3
    bodies = _history(score_dir, ids, AS_OF)
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        single = client.post("/v1/score", json={**bodies[0], "as_of": AS_OF})
        assert single.status_code == 200, single.text
        batch = client.post("/v1/score:batch", json={"as_of": AS_OF, "customers": bodies})
        assert batch.status_code == 200, batch.text
    answers = batch.json()["scores"]
    assert [a["customer_id"] for a in answers] == ids
    assert single.json() == answers[0]
    for a in answers:
        row = scores.loc[a["customer_id"]]
        for col in ("future_value_pred", "value_p10", "value_p50", "value_p90", "churn_prob"):
            assert a[col] == pytest.approx(row[col], abs=1e-6), (a["customer_id"], col)
        assert a["value_segment"] == row["value_segment"]
        for j, top in enumerate(a["top_features"], start=1):
            assert top["feature"] == row[f"top_feature_{j}"]
            assert top["contribution"] == pytest.approx(row[f"top_contrib_{j}"], abs=1e-6)
        assert a["model_run"] == row["model_run"]
        assert pd.Timestamp(a["as_of"]) == row["as_of"]


@pytest.mark.parametrize(
    "change, status, field",
    [
        (lambda b: b.update(nickname="x"), 422, "nickname"),
        (lambda b: b["transactions"][0].update(amout=3.0), 422, "amout"),
        (lambda b: b["transactions"][0].update(amount="lots"), 422, "amount"),
        (lambda b: b["transactions"][0].update(ts="yesterday"), 422, "ts"),
        (lambda b: b["reviews"][0].update(rating=9), 422, "rating"),
        (
            lambda b: b["transactions"][0].update(ts="2023-12-05T00:00:00Z"),
            422,
            "transactions[0].ts",
        ),
        (lambda b: b["reviews"][0].update(ts="2024-02-01"), 422, "reviews[0].ts"),
        (lambda b: b.update(transactions=[]), 422, "transactions"),
        (lambda b: b.update(customer_id=" "), 422, "customer_id"),
        (lambda b: b["reviews"][0].update(text="word " * 1000), 413, "reviews[0].text"),
        (
            lambda b: b.update(
                reviews=[{**b["reviews"][0], "review_id": f"r{i}"} for i in range(41)]
            ),
            413,
            "reviews: 41 reviews",
        ),
        (lambda b: b.update(reviews=b["reviews"] * 2), 422, "review_id values must be unique"),
        (
            lambda b: b.update(transactions=[{"order_id": "o1", "ts": "2023-01-01", "amount": -5}]),
            422,
            "no order with a positive value",
        ),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(serve_url, change, status, field):
    import httpx

    body = {
        "customer_id": "c-new",
        "as_of": AS_OF,
        "transactions": [{"order_id": "o1", "ts": "2023-01-02T10:00:00Z", "amount": 20.0}],
        "reviews": [{"review_id": "r1", "ts": "2023-01-03", "text": "great fast", "rating": 5}],
    }
    change(body)
    r = httpx.post(f"{serve_url}/v1/score", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert field in r.text
    assert "Traceback" not in r.text


def test_a_new_customer_without_reviews_scores_and_health_and_docs_answer(serve_url, trained_run):
    import httpx

    run_dir, _ = trained_run
    body = {
        "customer_id": "c-new",
        "as_of": AS_OF,
        "transactions": [
            {"order_id": "o1", "ts": "2023-01-02T10:00:00Z", "amount": 20.0},
            {"order_id": "o2", "ts": "2023-06-02T10:00:00Z", "amount": 35.5},
        ],
        "attributes": {"Country": "France"},
    }
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, r.text
        a = r.json()
        assert 0 <= a["churn_prob"] <= 1 and a["value_p10"] <= a["value_p90"]
        assert 1 <= a["value_segment"] <= 10 and len(a["top_features"]) == 3
        health = client.get("/healthz").json()
        assert health == {
            "status": "ok",
            "model_run": str(run_dir),
            "model_variant": "gbm_text_finetuned",
            "clvray_version": a["clvray_version"],
            "text": True,
        }
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/score", "/v1/score:batch", "/healthz"} <= set(paths)
        too_many = {
            "as_of": AS_OF,
            "customers": [
                {**{k: v for k, v in body.items() if k != "as_of"}, "customer_id": str(i)}
                for i in range(9)
            ],
        }
        r = client.post("/v1/score:batch", json=too_many)
        assert r.status_code == 413 and "customers" in r.text


def test_bench_quick_mode_writes_every_cell(serve_url, trained_run, tmp_path):
    """bench/serve.py in quick mode against the module's app: every cell answered, no
    thresholds (timings on a shared CI machine mean nothing)."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_dir, _ = trained_run
    out = tmp_path / "serve.json"
    report = bench.run_benchmark(
        str(run_dir), url=serve_url, concurrencies=(1, 8), duration_s=1.0, max_requests=12,
        n_customers=4, out=out,
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    cells = {(r["path"], r["concurrency"], r["text"]) for r in report["rows"]}
    assert cells == {
        (path, c, text)
        for text in (True, False)
        for path, c in (("in-process", 1), ("serve-http", 1), ("serve-http", 8))
    }
    for row in report["rows"]:
        assert row["errors"] == 0 and 0 < row["requests"] <= 12
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert report["machine"]["cores"] >= 1
    with_text = [r for r in report["rows"] if r["text"]]
    assert all(r["reviews_per_request"] > 0 for r in with_text)
