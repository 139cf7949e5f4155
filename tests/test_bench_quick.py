"""Quick modes of the side-by-side benchmarks, so none of them rots. No timing is asserted:
what is checked is that both sides ran on the same input and agree on the result."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO

# A benchmark marked `cluster` starts its own Ray (a child process per side), which tiers it as
# integration: `make test-fast` leaves it out.


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.cluster
@pytest.mark.slow
def test_ingest_features_quick_gives_polars_values(tmp_path):
    rows = _bench("ingest_features").main(
        ["--quick", "--num-cpus", "2", "--data-root", str(tmp_path / "data"),
         "--work", str(tmp_path / "work"), "--keep-features", str(tmp_path / "features")]
    )  # fmt: skip
    (row,) = rows
    assert row["transactions"] > 10_000 and row["customers"] > 1000
    assert row["same_values"], row["mismatched"]
    assert row["clvray_peak_gib"] > 0 and row["polars_peak_gib"] > 0


@pytest.mark.cluster
@pytest.mark.slow
def test_embed_quick_gives_the_loops_embeddings(tmp_path, tiny_encoder):
    (row,) = _bench("embed").main(
        ["--quick", "--kinds", "synthetic", "--model", tiny_encoder, "--num-cpus", "2",
         "--work", str(tmp_path)]
    )  # fmt: skip
    assert row["reviews"] == 64
    assert row["max_abs_diff"] < 1e-4  # same model, same reviews, same vectors
    assert row["a_clvray_per_s"] > 0 and row["b_loop_per_s"] > 0 and row["c_single_per_s"] > 0


@pytest.mark.cluster
@pytest.mark.slow
def test_xgb_quick_gives_the_same_metrics(tmp_path):
    trainer, single = _bench("xgb_train").main(
        ["--quick", "--num-workers", "2", "--num-cpus", "2", "--work", str(tmp_path)]
    )
    assert trainer["customers"] == single["customers"] > 1000
    assert 0.5 < single["churn_auc"] <= 1 and 0 < single["gini"] <= 1
    # Same data, params, split and recipe: two workers fit the boosters one process fits.
    assert trainer["best_iterations"] == single["best_iterations"]
    assert (trainer["gini"], trainer["churn_auc"]) == (single["gini"], single["churn_auc"])


@pytest.mark.cluster
@pytest.mark.slow
def test_finetune_quick_runs_both_sides_on_the_same_reviews(tmp_path, tiny_encoder):
    trainer, loop = _bench("finetune").main(
        ["--quick", "--model", tiny_encoder, "--num-cpus", "2", "--work", str(tmp_path)]
    )
    assert trainer["reviews"] == loop["reviews"] > 50
    assert trainer["samples_per_s"] > 0 and loop["samples_per_s"] > 0


def test_performance_section_is_generated_from_results_files(tmp_path, monkeypatch):
    common = _bench("common")
    perf = _bench("perf_readme")
    results = tmp_path / "results"
    results.mkdir()
    row = {"data": "synthetic", "reviews": 64, "a_clvray_per_s": 10.0, "b_loop_per_s": 20.0}
    (results / "embed.json").write_text(
        '{"name": "embed", "date": "2026-11-30", "command": "python bench/embed.py",'
        ' "machine": {"cpu": "CPU X", "cores": 2, "ram_gib": 24, "gpu": null},'
        f' "rows": [{__import__("json").dumps(row)}]}}'
    )
    monkeypatch.setattr(perf, "RESULTS", results)
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Performance\n\n<!-- performance:start -->\nold\n<!-- performance:end -->\n"
    )
    perf.update_readme(readme)
    text = readme.read_text()
    assert "old" not in text and "CPU X, 2 cores, 24 GiB RAM, no GPU" in text
    assert "| synthetic | 64 | 10 | 20 |" in text
    assert common.table([{"a": True}], ["a"]).endswith("| yes |")


def test_gpu_script_smoke_runs_on_cpu():
    """bench/gpu.py is meant for a GPU machine; its quick mode runs the same code on CPU."""
    rows = _bench("gpu").main(["--quick"])
    assert [r["work"] for r in rows] == ["embed (fp32)", "fine-tune (fp32)"]
    assert all(r["reviews_per_s"] > 0 and r["mean_tokens"] > 1 for r in rows)
    gpu = _bench("gpu")
    assert gpu.peak_tflops("NVIDIA H200", None) == 989.0 and gpu.peak_tflops("CPU", None) is None
