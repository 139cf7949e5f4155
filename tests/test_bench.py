"""bench/cost.py: the billion-review estimate is arithmetic on a run's own timings."""

from __future__ import annotations

import importlib.util
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO


def _cost_module():
    spec = importlib.util.spec_from_file_location("bench_cost", REPO / "bench" / "cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cost_scales_each_stage_by_its_measured_rate(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "text/gbm_text_finetuned/embeddings").mkdir(parents=True)
    pq.write_table(
        pa.table({"review_id": [f"R{i}" for i in range(400)]}),
        run / "text/gbm_text_finetuned/embeddings/part-0.parquet",
    )
    (run / "text/finetune/enc/model").mkdir(parents=True)
    (run / "text/finetune/enc/model/clvray_text.json").write_text(
        json.dumps({"n_train_reviews": 80, "n_valid_reviews": 20, "text_config": {}})
    )
    metrics = {
        "cutoff": "2023-10-01T00:00:00+00:00",
        "counts": {"transactions": {"rows_in": 1200}, "reviews": {"rows_in": 400}},
        "population": {"customers": 200},
        "cluster": {"CPU": 4.0},
        "timings_s": {
            "ingest": 10.0,
            "text/finetune": 5.0,
            "text/gbm_text_finetuned/embed": 20.0,
            "train/gbm_behavioural": 2.0,
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    cost = _cost_module()
    stages, ratios = cost.stage_rates(run)
    assert stages["ingest (validate, normalise)"] == (1600, "input rows", 10.0)
    assert stages["tokenize + embed (finetuned)"] == (400, "reviews", 20.0)
    assert stages["fine-tune (sample)"] == (100, "reviews", 5.0)
    assert ratios["transactions_per_review"] == 3.0 and ratios["customers_per_review"] == 0.5

    workers = {
        "node_type": "cpu_worker",
        "instance_type": "c5.9xlarge",
        "vcpus_per_node": 36,
        "max_workers": 5,
        "file": "cluster.yaml",
    }
    table = cost.estimate(
        run, reviews=1e6, vcpu_hour_usd=0.5, finetune_reviews=1000, workers=workers
    )
    # embed: 400 reviews / 20 s / 4 vCPUs = 5 reviews per vCPU-s -> 1e6 / 5 / 3600 = 55.6 h
    assert "| 5.0 | 1e+06 reviews | 56 | $28 |" in table
    # ingest: 1600 rows / 10 s / 4 = 40 per vCPU-s; 1e6 reviews * (1 + 3) = 4e6 rows -> 27.8 h
    assert "| 40.0 | 4e+06 input rows | 28 | $14 |" in table
    # fine-tune: 100 / 5 / 4 = 5 per vCPU-s on the 1000-review sample -> 0.06 h
    hours = 1e6 / 5 / 3600 + 4e6 / 40 / 3600 + 1000 / 5 / 3600 + 1e6 * 0.5 / 25 / 3600
    assert f"**{hours:,.0f}**" in table
    assert f"**${hours * 0.5:,.0f}**" in table
    assert (
        f"5 `cpu_worker` nodes (c5.9xlarge, 36 vCPUs each: 180 vCPUs), that is about "
        f"{hours / 180:,.0f} hours of wall time" in table
    )


def test_cost_reads_worker_type_and_vcpus_from_cluster_yaml(tmp_path) -> None:
    cost = _cost_module()
    real = cost.cluster_workers(REPO / "cluster.yaml")
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    spec = cluster["available_node_types"]["cpu_worker"]
    assert real["instance_type"] == spec["node_config"]["InstanceType"]
    assert real["max_workers"] == spec["max_workers"]
    assert real["vcpus_per_node"] == cost.instance_vcpus(real["instance_type"])

    # a changed cluster file changes the estimate's cluster
    spec["node_config"]["InstanceType"] = "c5.9xlarge"
    spec["max_workers"] = 7
    edited = tmp_path / "cluster.yaml"
    edited.write_text(yaml.safe_dump(cluster))
    assert cost.cluster_workers(edited) | {"file": None} == {
        "node_type": "cpu_worker",
        "instance_type": "c5.9xlarge",
        "vcpus_per_node": 36,
        "max_workers": 7,
        "file": None,
    }
    # an explicit resources.CPU is what Ray schedules with, whatever the instance type
    spec["resources"] = {"CPU": 12}
    edited.write_text(yaml.safe_dump(cluster))
    assert cost.cluster_workers(edited)["vcpus_per_node"] == 12


@pytest.mark.parametrize(
    ("instance", "vcpus"),
    [("m5.large", 2), ("m5.xlarge", 4), ("m5.4xlarge", 16), ("c5.9xlarge", 36), ("g5.xlarge", 4)],
)
def test_instance_vcpus_follow_the_aws_size(instance, vcpus) -> None:
    assert _cost_module().instance_vcpus(instance) == vcpus


def test_unknown_instance_size_asks_for_resources_cpu() -> None:
    with pytest.raises(ValueError, match="resources"):
        _cost_module().instance_vcpus("m5.metal")


def test_readme_cost_paragraph_is_for_the_cluster_yaml_workers() -> None:
    w = _cost_module().cluster_workers(REPO / "cluster.yaml")
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- cost:start -->", 1)[1].split("<!-- cost:end -->", 1)[0]
    total = w["vcpus_per_node"] * w["max_workers"]
    assert (
        f"{w['max_workers']} `{w['node_type']}` nodes ({w['instance_type']}, "
        f"{w['vcpus_per_node']} vCPUs each: {total:,} vCPUs)"
    ) in block
    hours = float(re.search(r"\*\*([\d,]+)\*\*", block).group(1).replace(",", ""))
    assert f"about {hours / total:,.0f} hours of wall time" in block


def test_cost_refuses_a_run_without_metrics(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        _cost_module().stage_rates(tmp_path)


def test_cost_uses_rates_measured_at_scale_when_the_benchmarks_ran(tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "ingest_features.json").write_text(
        json.dumps(
            {
                "machine": {"cores": 2},
                "rows": [
                    {
                        "transactions": 1000,
                        "reviews": 0,
                        "clvray_ingest_s": 1.0,
                        "clvray_features_s": 1.0,
                    },
                    {
                        "transactions": 8000,
                        "reviews": 2000,
                        "clvray_ingest_s": 5.0,
                        "clvray_features_s": 2.0,
                    },
                ],
            }
        )
    )
    (results / "embed.json").write_text(
        json.dumps(
            {
                "machine": {"cores": 2},
                "rows": [{"data": "amazon", "reviews": 100, "a_clvray_per_s": 30.0}],
            }
        )
    )
    rates = _cost_module().scale_rates(results)
    assert rates["ingest"][0] == 10000 / 5.0 / 2 and rates["features"][0] == 10000 / 2.0 / 2
    assert rates["tokenize + embed"][0] == 15.0
    assert "8,000 transactions" in rates["ingest"][1]
