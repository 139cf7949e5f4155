"""The stage graph and its runner: fingerprints, skip, staged commit, slices, empty outputs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clvray.config import load_config
from clvray.graph import Runner, Stage, StageContext, StageError, fingerprints
from clvray.stages import build_stages
from clvray.storage import Storage

# --- a toy graph: stages that write parquet through the runner's storage -----------------------


def _write_rows(ctx: StageContext, folder: str, n: int) -> None:
    fs, path = ctx.storage.filesystem(ctx.uri(folder))
    fs.create_dir(path, recursive=True)
    pq.write_table(pa.table({"x": list(range(n))}), f"{path}/part-0.parquet", filesystem=fs)


def _toy(calls: list[str], fail: set[str] | None = None, rows: int = 3) -> list[Stage]:
    def make(name: str, folder: str):
        def run(ctx: StageContext) -> dict:
            calls.append(name)
            _write_rows(ctx, folder, rows)
            if fail and name in fail:
                raise RuntimeError(f"{name} killed mid-stage")
            return {"rows": rows}

        return run

    return [
        Stage("a", make("a", "a"), outputs=("a",), sections=("ingest",)),
        Stage("b", make("b", "b"), inputs=("a",), outputs=("b",), sections=("features",),
              require_rows=("b",), explain_empty=lambda ctx, f: "the toy data is empty"),
        Stage("c", make("c", "c"), inputs=("b",), outputs=("c",), sections=("score",)),
        Stage("d", make("d", "d"), inputs=("a",), outputs=("d",), sections=("train",)),
    ]  # fmt: skip


def _runner(tmp_path, stages, *overrides: str) -> Runner:
    cfg = load_config(None, list(overrides))
    return Runner(stages, cfg, Storage(), str(tmp_path / "run"))


def test_a_changed_key_reruns_its_stage_and_what_depends_on_it(tmp_path):
    calls: list[str] = []
    assert _runner(tmp_path, _toy(calls)).run().ran == ["a", "b", "c", "d"]
    calls.clear()
    result = _runner(tmp_path, _toy(calls), "features.horizon_days=30").run()
    assert calls == ["b", "c"] and result.skipped == ["a", "d"]
    calls.clear()
    assert _runner(tmp_path, _toy(calls), "features.horizon_days=30").run().ran == []
    # timings live in the markers: still reported for stages this run skipped
    runner = _runner(tmp_path, _toy(calls), "features.horizon_days=30")
    assert set(runner.timings()) == {"a", "b", "c", "d"}
    plan = {r["stage"]: r["status"] for r in runner.plan()}
    assert plan == dict.fromkeys("abcd", "skip: done")


def test_plan_says_what_would_run_and_why(tmp_path):
    calls: list[str] = []
    _runner(tmp_path, _toy(calls)).run()
    plan = {r["stage"]: r["status"] for r in _runner(tmp_path, _toy(calls), "score.top_contributions=1").plan()}  # fmt: skip
    assert plan == {
        "a": "skip: done",
        "b": "skip: done",
        "c": "run: config or input changed",
        "d": "skip: done",
    }
    assert not calls[4:]  # planning runs nothing


def test_a_stage_killed_mid_write_leaves_nothing_a_rerun_takes_as_done(tmp_path):
    calls: list[str] = []
    _runner(tmp_path, _toy(calls)).run()
    calls.clear()
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        _runner(tmp_path, _toy(calls, fail={"b"}, rows=7), "features.horizon_days=30").run()
    run = tmp_path / "run"
    # the partial write stayed in staging: the committed output is the earlier one, unmarked
    assert pq.read_table(run / "b").num_rows == 3
    assert not (run / "_stages" / "b.json").exists()
    calls.clear()
    result = _runner(tmp_path, _toy(calls, rows=7), "features.horizon_days=30").run()
    assert result.ran == ["b", "c"]
    assert pq.read_table(run / "b").num_rows == 7
    assert not (run / "_staging").exists() or not any((run / "_staging").iterdir())
    marker = json.loads((run / "_stages" / "b.json").read_text())
    assert marker["rows"] == 7 and marker["seconds"] >= 0


def test_an_empty_required_output_fails_with_the_reason_and_is_never_done(tmp_path):
    calls: list[str] = []
    for _ in range(2):  # the second run must not skip to the same state
        with pytest.raises(StageError, match="stage b wrote no rows to b: the toy data is empty"):
            _runner(tmp_path, _toy(calls, rows=0)).run()
    assert calls == ["a", "b", "b"]
    assert not (tmp_path / "run" / "b").exists()


def test_until_and_only_run_a_slice(tmp_path):
    calls: list[str] = []
    assert _runner(tmp_path, _toy(calls)).run(until="b").ran == ["a", "b"]
    with pytest.raises(StageError, match="needs b"):
        _runner(tmp_path, _toy(calls), "features.horizon_days=5").run(only=["c"])
    assert _runner(tmp_path, _toy(calls)).run(only=["d"]).ran == ["d"]
    with pytest.raises(StageError, match="no stage 'e'"):
        _runner(tmp_path, _toy(calls)).run(until="e")


# --- the real graph's fingerprints (no Ray: the graph is declared from the config alone) -------


def _fingerprints(*overrides: str) -> dict[str, str]:
    cfg = load_config("configs/demo.yaml", ["data.transactions=tx", "data.reviews=rv", *overrides])
    return fingerprints(build_stages(cfg, has_reviews=True), cfg)


def _changed(*overrides: str) -> set[str]:
    before, after = _fingerprints(), _fingerprints(*overrides)
    assert set(before) == set(after)
    return {s for s in before if before[s] != after[s]}


def test_top_contributions_reruns_score_evaluate_and_report_only():
    assert _changed("score.top_contributions=1") == {
        "score/gbm_behavioural",
        "score/gbm_text_pretrained",
        "score/gbm_text_finetuned",
        "evaluate",
        "report",
    }


def test_finetune_epochs_leave_ingest_features_and_the_pretrained_path_alone():
    changed = _changed("text.finetune.epochs=2")
    assert "text/finetune" in changed and "train/gbm_text_finetuned" in changed
    assert not changed & {
        "ingest",
        "features",
        "btyd",
        "fuse/gbm_behavioural",
        "train/gbm_behavioural",
        "text/gbm_text_pretrained/embed",
        "train/gbm_text_pretrained",
    }


def test_the_pretrained_ablation_is_in_the_default_graph_and_can_be_left_out():
    from clvray.stages import variants_of

    cfg = load_config("configs/demo.yaml")
    assert variants_of(cfg, has_reviews=True) == [
        "gbm_behavioural", "gbm_text_pretrained", "gbm_text_finetuned"
    ]  # fmt: skip
    assert variants_of(cfg, has_reviews=False) == ["gbm_behavioural"]
    lean = load_config("configs/demo.yaml", ["text.pretrained_variant=false"])
    assert variants_of(lean, has_reviews=True) == ["gbm_behavioural", "gbm_text_finetuned"]
    names = {s.name for s in build_stages(lean, has_reviews=True)}
    assert not {n for n in names if "pretrained" in n}
    no_finetune = load_config(
        "configs/demo.yaml", ["text.pretrained_variant=false", "text.finetune.enabled=false"]
    )
    assert variants_of(no_finetune, has_reviews=True) == ["gbm_behavioural", "gbm_text_pretrained"]


def test_every_stage_reads_only_keys_that_exist_and_outputs_are_owned_once():
    cfg = load_config("configs/demo.yaml", ["data.transactions=tx", "data.reviews=rv"])
    stages = build_stages(cfg, has_reviews=True)
    Runner(stages, cfg, Storage(), "unused")  # checks the graph; raises on a bad section key
    assert [s.name for s in stages][:2] == ["ingest", "features"]
    assert stages[-1].name == "report"
