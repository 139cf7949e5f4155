"""Quick modes of the side-by-side benchmarks, so none of them rots. No timing is asserted:
what is checked is that both sides ran on the same input and agree on the result."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


@pytest.mark.slow
def test_embed_quick_gives_the_loops_embeddings(tmp_path, tiny_encoder):
    (row,) = _bench("embed").main(
        ["--quick", "--kinds", "synthetic", "--model", tiny_encoder, "--num-cpus", "2",
         "--work", str(tmp_path)]
    )  # fmt: skip
    assert row["reviews"] == 64
    assert row["max_abs_diff"] < 1e-4  # same model, same reviews, same vectors
    assert row["a_clvray_per_s"] > 0 and row["b_loop_per_s"] > 0 and row["c_single_per_s"] > 0


@pytest.mark.slow
def test_xgb_quick_gives_the_same_metrics(tmp_path):
    trainer, single = _bench("xgb_train").main(
        ["--quick", "--num-workers", "2", "--num-cpus", "2", "--work", str(tmp_path)]
    )
    assert trainer["customers"] == single["customers"] > 1000
    assert 0.5 < single["churn_auc"] <= 1 and 0 < single["gini"] <= 1
    # Same data, params and split; the distributed histograms differ only slightly.
    assert trainer["auc_rel_diff"] < 0.05 and trainer["gini_rel_diff"] < 0.05
