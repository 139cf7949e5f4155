"""End to end: the job entry point on tiny synthetic data, asserting on what it writes."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from clvray.features import split_of

pytestmark = pytest.mark.slow

N_CUSTOMERS = 300


def _argv(storage, *extra):
    return [
        "--config",
        "configs/demo.yaml",
        "--storage",
        str(storage),
        "--set",
        f"data.synthetic.n_customers={N_CUSTOMERS}",
        "--set",
        "features.num_partitions=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def pipeline_run(text_run):
    """The whole job, text path included: fine-tune (tiny BERT), embed, topics as features
    (the session's shared run, tests/conftest.py; behavioural-only runs are exercised by
    tests/test_s3.py and tests/test_job_submit.py)."""
    run_dir, _, argv = text_run
    return run_dir, argv


def test_metrics_json_holds_every_model_and_the_counts(pipeline_run):
    run_dir, _ = pipeline_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("gbm_behavioural", "heuristic", "bgnbd_gamma_gamma", "oracle"):
        assert -1 <= metrics["models"][name]["value"]["normalized_gini"] <= 1
    gbm = metrics["models"]["gbm_behavioural"]
    assert 0.5 < gbm["churn"]["roc_auc"] <= 1
    # the oracle knows the latent state: nothing fitted on data may beat it by much
    assert (
        metrics["models"]["oracle"]["value"]["normalized_gini"]
        > gbm["value"]["normalized_gini"] - 0.05
    )
    tx = metrics["counts"]["transactions"]
    assert tx["rows_in"] == tx["rows_accepted"] + tx["rows_rejected"] > 0
    assert (run_dir / "config.yaml").exists()
    html = (run_dir / "report" / "index.html").read_text()
    assert 'id="gain-chart"' in html and "bgnbd_gamma_gamma" in html


def test_scores_cover_every_customer_once(pipeline_run):
    run_dir, _ = pipeline_run
    scores = pd.read_parquet(run_dir / "scores" / "gbm_text_finetuned")
    customers = pd.read_parquet(run_dir / "features" / "customers")
    assert scores["customer_id"].is_unique
    assert set(scores["customer_id"]) == set(customers["customer_id"])
    assert scores["value_segment"].between(1, 10).all()
    assert (scores["value_p10"] <= scores["value_p90"]).all()
    assert scores["churn_prob"].between(0, 1).all()
    assert set(scores["top_feature_1"]) <= set(
        json.loads((run_dir / "models/gbm_text_finetuned/meta.json").read_text())["features"]
    )
    # the split recorded with the scores is the stable hash split
    expected = split_of(scores["customer_id"], 0.15, 0.2)
    assert (scores["split"].to_numpy() == expected).all()


def test_every_variant_is_scored_once_and_evaluated_from_its_scores(pipeline_run):
    run_dir, _ = pipeline_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = None
    for variant in ("gbm_behavioural", "gbm_text_finetuned"):
        scores = pd.read_parquet(run_dir / "scores" / variant)
        edges = json.loads((run_dir / "scores" / variant / "_segments.json").read_text())["edges"]
        train = scores.loc[scores["split"] == "train", "future_value_pred"]
        # segment edges are the deciles of the scored train split
        assert edges == pytest.approx(list(train.quantile([i / 10 for i in range(1, 10)])))
        t = scores[scores["split"] == "test"].sort_values("customer_id")
        test = t if test is None else test
        assert (t["customer_id"].to_numpy() == test["customer_id"].to_numpy()).all()
        # the metrics are those of the written scores (no second prediction on the driver)
        from clvray.metrics import normalized_gini

        gini = normalized_gini(t["future_value"].to_numpy(float), t["future_value_pred"].to_numpy())
        assert metrics["models"][variant]["value"]["normalized_gini"] == pytest.approx(gini)


def test_rerun_with_same_config_skips_every_stage(pipeline_run):
    import jobs.pipeline as job

    run_dir, argv = pipeline_run
    first = json.loads((run_dir / "metrics.json").read_text())
    assert job.main(argv) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ran_stages"] == []
    assert (
        set(metrics["skipped_stages"])
        == set(first["ran_stages"])
        >= {
            "ingest",
            "features",
            "text/finetune",
            "text/topics",
            "train/gbm_behavioural",
            "score/gbm_text_finetuned",
            "report",
        }
    )
    # what the skipped stages cost when they ran is kept (from their markers)
    assert metrics["timings_s"] == first["timings_s"]


def test_a_changed_score_key_reruns_score_evaluate_and_report_only(pipeline_run, capsys):
    """Against the finished run's markers: what `--plan` says is what the runner does (the
    runner's execution of a plan is tested in tests/test_graph.py), without re-running the
    shared run."""
    import jobs.pipeline as job

    _, argv = pipeline_run
    capsys.readouterr()
    assert job.main([*argv, "--set", "score.top_contributions=1", "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line for line in lines[2:] if line and not line[0].isspace()}
    runs = {name for name, line in status.items() if " run: " in line}
    assert runs == {
        "score/gbm_behavioural",
        "score/gbm_text_finetuned",
        "evaluate",
        "report",
    }
    assert all(line.endswith("skip: done") for name, line in status.items() if name not in runs)
    assert len(status) >= 13


def test_plan_prints_the_graph_and_what_would_run(pipeline_run, capsys):
    import jobs.pipeline as job

    _, argv = pipeline_run
    capsys.readouterr()
    assert job.main([*argv, "--set", "train.max_depth=3", "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line for line in lines[2:] if line and not line[0].isspace()}
    assert status["ingest"].endswith("skip: done")
    assert status["train/gbm_behavioural"].endswith("run: config or input changed")
    assert status["report"].endswith("run: an input re-runs")


def test_a_cutoff_before_the_data_fails_naming_the_range(ray_local, tmp_path, capsys):
    import jobs.pipeline as job

    argv = _argv(tmp_path, "--run-id", "early", "--set", "text.enabled=false",
                 "--set", "features.cutoff=2021-01-01", "--until", "features")  # fmt: skip
    for _ in range(2):  # nothing is marked done: the re-run fails the same way
        # The time protocol is checked as the features stage starts, before any work.
        assert job.main(argv) == 2
        err = capsys.readouterr().err
        assert "features.cutoff 2021-01-01 must lie after the start of the data" in err
        assert "the accepted transactions run from 2022-01-" in err
    assert not (tmp_path / "early" / "features").exists()
    assert not (tmp_path / "early" / "_stages" / "features.json").exists()


def test_config_error_exits_with_the_key(capsys):
    import jobs.pipeline as job

    assert job.main(["--config", "configs/demo.yaml", "--set", "features.horizon=3"]) == 2
    assert "unknown config key 'features.horizon'" in capsys.readouterr().err


def test_text_run_holds_the_ablation_and_topics(pipeline_run):
    """The shared run leaves out the pretrained-encoder variant (`text.pretrained_variant`):
    behavioural and fine-tuned text, side by side."""
    run_dir, _ = pipeline_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["ablation"]) == {"gbm_behavioural", "gbm_text_finetuned"}
    assert not (run_dir / "text" / "gbm_text_pretrained").exists()
    assert metrics["primary_model"] == "gbm_text_finetuned"
    n = {v["value"]["n"] for k, v in metrics["models"].items() if k.startswith("gbm_")}
    assert len(n) == 1  # every variant scored on the same test customers
    topics = metrics["topics"]["topics"]
    reviews = pd.read_parquet(run_dir / "text" / "topics" / "assignments")
    assert sum(t["reviews"] for t in topics) == len(reviews) > 0
    assert all(t["words"] for t in topics)
    # the topic shares reached the primary model as features
    meta = json.loads((run_dir / "models" / "gbm_text_finetuned" / "meta.json").read_text())
    assert "topic_share_0" in meta["features"] and "txt_score_mean" in meta["features"]
    html = (run_dir / "report" / "index.html").read_text()
    assert 'id="topics"' in html and topics[0]["words"][0] in html
    # each embedding stage says how many reviews it embedded and how many it cut short
    assert set(metrics["embedding"]) == {"text/gbm_text_finetuned/embed"}
    counts = metrics["embedding"]["text/gbm_text_finetuned/embed"]
    table = pd.read_parquet(run_dir / "text" / "gbm_text_finetuned" / "embeddings")
    assert counts["reviews_embedded"] == len(table) > 0
    assert counts["reviews_truncated"] == int(table["truncated"].sum())


def test_text_defaults_search_reads_the_shipped_models(pipeline_run, tmp_path, monkeypatch):
    """bench/text_defaults.py on a copy of the shared run, with the one grid point that is the
    run's own config: every stage is the run's (nothing re-runs), and its row holds the
    fine-tuned model's valid-split numbers from meta.json and the test lift from metrics.json."""
    import shutil

    import bench.common as common
    import bench.text_defaults as search

    run_dir, argv = pipeline_run
    copy = run_dir.parent / "e2e-text-defaults"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy, symlinks=True)
    grid_keys = ("text.finetune.target", "text.embed.reduce_dim", "text.topics.as_features")
    sets = [v for k, v in zip(argv, argv[1:], strict=False) if k == "--set"]
    sets = [v for v in sets if not v.startswith(grid_keys)]
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    point = ["--targets", "churn", "--dims", "4", "--topics", "true"]
    options = ["--storage", str(run_dir.parent), "--run-id", copy.name, *point]
    assert search.main([*options, *[a for v in sets for a in ("--set", v)]]) == 0
    ran = json.loads((copy / "metrics.json").read_text())["ran_stages"]
    shutil.rmtree(copy)
    assert ran == []
    out = json.loads((tmp_path / "text_defaults.json").read_text())
    (row,) = out["rows"]
    meta = json.loads((run_dir / "models" / "gbm_text_finetuned" / "meta.json").read_text())
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    chosen = meta["value_model"]["chosen"]
    assert row["value_model"] == chosen
    assert row["valid_gini"] == meta["value_model"]["valid"][chosen]["normalized_gini"]
    assert row["valid_churn_logloss"] == meta["results"]["churn"]["valid_logloss"]
    assert row["lift"] == metrics["text_lift"]["gbm_text_finetuned"]
    assert row["test_gini"] == metrics["ablation"]["gbm_text_finetuned"]["normalized_gini"]
    assert out["pick_on_valid"] == {"target": "churn", "dims": 4, "topics_as_features": True}
    assert out["machine"]["cores"]


def test_training_again_on_two_workers_gives_the_same_scores(pipeline_run):
    """Same config and seed, trained again with two XGBoost workers instead of one (Ray Data
    delivers the rows anew, in its own order and blocks, and splits them over the workers):
    `scores/` must be identical, value for value. Run on a copy of the shared run (another run
    id over the same data), which re-runs only the behavioural model and its scores."""
    import shutil

    import jobs.pipeline as job

    run_dir, argv = pipeline_run
    copy = run_dir.parent / "e2e-trained-again"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy, symlinks=True)
    other = [*argv, "--run-id", copy.name]  # the last --run-id wins
    other += ["--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5"]
    other += ["--only", "train/gbm_behavioural", "--only", "score/gbm_behavioural"]
    assert job.main(other) == 0
    marker = json.loads((copy / "_stages" / "train" / "gbm_behavioural.json").read_text())
    original = json.loads((run_dir / "_stages" / "train" / "gbm_behavioural.json").read_text())
    assert marker["fingerprint"] != original["fingerprint"]  # it did train again

    def scores(root):
        table = pq.read_table(root / "scores" / "gbm_behavioural")
        return table.sort_by("customer_id")

    got, expected = scores(copy), scores(run_dir)
    shutil.rmtree(copy)
    assert got.num_rows == expected.num_rows > 0
    differ = [c for c in expected.column_names if not got[c].equals(expected[c])]
    assert got.column_names == expected.column_names and not differ, differ


def test_no_secret_from_the_environment_in_any_file_the_run_wrote(pipeline_run):
    """Every process of the run held AWS_SECRET_ACCESS_KEY and a planted secret (set by
    tests/conftest.py before Ray started): no file of the run (outputs, markers, logs, Ray
    Train checkpoints, the fine-tuned model, the report) may contain either."""
    import os

    from tests.conftest import PLANTED_SECRET

    run_dir, _ = pipeline_run
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), PLANTED_SECRET.encode()]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.parts[-2:] == ("logs", "ray.log") for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret.decode()!r} found in {path}"
