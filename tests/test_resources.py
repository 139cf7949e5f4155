"""Worker and actor counts that cannot run beside their feeders are refused before any work."""

from __future__ import annotations

import pytest

from clvray.config import load_config
from clvray.resources import Cluster, ResourceError, check_fits, embed_actors, embed_threads

TWO_CPUS = Cluster(cpus=2, gpus=0, nodes=1)


def test_two_embedding_actors_on_two_cpus_are_refused_with_what_fits():
    cfg = load_config(None, ["text.embed.max_actors=2"])
    with pytest.raises(ResourceError, match=r"text\.embed\.max_actors=2 .* at most 1 actor"):
        check_fits(cfg, TWO_CPUS)


def test_fractional_actors_fit_and_defaults_fit_two_cpus():
    check_fits(load_config(None, []), TWO_CPUS)  # the embedded default runs on 2 CPUs
    check_fits(
        load_config(None, ["text.embed.max_actors=2", "text.embed.cpus_per_actor=0.5"]), TWO_CPUS
    )


def test_xgboost_workers_beyond_the_cluster_are_refused():
    cfg = load_config(None, ["train.num_workers=3", "train.cpus_per_worker=1"])
    with pytest.raises(ResourceError, match=r"train\.num_workers=3 .* at most 2 worker"):
        check_fits(cfg, TWO_CPUS)
    # Training reads materialized shards: workers may hold every CPU.
    check_fits(load_config(None, ["train.num_workers=2"]), TWO_CPUS)


def test_gpu_requests_need_gpus_and_autoscaling_skips_the_check():
    cfg = load_config(None, ["text.embed.num_gpus_per_actor=1", "text.finetune.use_gpu=true"])
    with pytest.raises(ResourceError, match="GPU") as err:
        check_fits(cfg, TWO_CPUS)
    assert "text.finetune.use_gpu" in str(err.value) and "num_gpus_per_actor" in str(err.value)
    check_fits(load_config(None, ["ray.autoscaling=true", "train.num_workers=64"]), TWO_CPUS)


def test_auto_actor_count_and_threads_share_the_node():
    e = load_config(None, []).text.embed
    assert embed_actors(e, TWO_CPUS) == 1
    assert embed_threads(e, TWO_CPUS) == 2  # one actor, both cores
    big = Cluster(cpus=16, gpus=0, nodes=1)
    assert embed_actors(e, big) == 15 and embed_threads(e, big) == 1
    assert embed_threads(e, Cluster(cpus=32, gpus=0, nodes=2)) == 1  # multi-node: CPUs held
    gpu = load_config(None, ["text.embed.num_gpus_per_actor=0.5"]).text.embed
    assert embed_actors(gpu, Cluster(cpus=8, gpus=2, nodes=1)) == 4
    fixed = load_config(None, ["text.embed.max_actors=3", "text.embed.torch_threads=5"]).text.embed
    assert embed_actors(fixed, big) == 3 and embed_threads(fixed, big) == 5
