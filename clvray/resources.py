"""Refuse, before any work, a worker or actor count that cannot run beside the tasks feeding it.

On Ray, an actor pool or a set of Train workers that holds every CPU of the cluster leaves none
for the read / tokenize / map tasks that feed it: the job does not fail, it waits forever
(measured: 2 embedding actors of 1 CPU, or 2 XGBoost workers of 1 CPU, on a 2-CPU node).
`check_fits` compares what the config asks for with the cluster's CPUs and GPUs and raises
`ResourceError` saying what fits. XGBoost and fine-tuning read materialized datasets (no task
has to run while their workers hold the CPUs), so they may use every CPU; streaming actor pools
(embedding) must leave one CPU to their feeders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clvray.config import Config, EmbedSection

FEEDER_CPUS = 1.0
"""CPUs a streaming stage's read / tokenize / map tasks need to make progress."""


class ResourceError(ValueError):
    """The config asks for more than the cluster can run at once."""


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    nodes: int = 1

    @classmethod
    def current(cls) -> Cluster:
        import ray

        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU"))
        return cls(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)), max(nodes, 1))


def embed_actors(e: EmbedSection, cluster: Cluster) -> int:
    """Encoder actors of the embed stage: `max_actors`, or as many as fit beside the feeders."""
    if e.max_actors is not None:
        return max(e.max_actors, e.min_actors)
    if e.num_gpus_per_actor > 0:
        return max(e.min_actors, int(cluster.gpus // e.num_gpus_per_actor))
    return max(e.min_actors, int(max(cluster.cpus - FEEDER_CPUS, 0.0) // e.cpus_per_actor))


def embed_threads(e: EmbedSection, cluster: Cluster) -> int:
    """Torch threads per encoder actor: `torch_threads`, else the CPUs it holds, raised on a
    one-node CPU cluster to share the node's cores among the actors (the feeders' logical CPU
    is mostly idle: tokenization costs a few percent of encoding)."""
    if e.torch_threads is not None:
        return e.torch_threads
    held = max(1, math.ceil(e.cpus_per_actor))
    if e.num_gpus_per_actor > 0 or cluster.nodes != 1:
        return held
    return max(held, int(cluster.cpus // embed_actors(e, cluster)))


def _fits(count: int, per: float, free: float) -> int:
    return int(free // per) if per > 0 else count


def problems(cfg: Config, cluster: Cluster) -> list[str]:
    """Every part of `cfg` that cannot be scheduled on `cluster`, as messages naming the keys."""
    out: list[str] = []
    if cfg.ray.autoscaling:
        return out  # nodes arrive on demand: today's resources say nothing about tomorrow's
    t = cfg.train
    need = t.num_workers * t.cpus_per_worker
    if need > cluster.cpus:
        out.append(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} "
            f"= {need:g} CPUs, but the cluster has {cluster.cpus:g}; at most "
            f"{_fits(t.num_workers, t.cpus_per_worker, cluster.cpus)} worker(s) of "
            f"{t.cpus_per_worker:g} CPU fit"
        )
    if t.use_gpu and t.num_workers > cluster.gpus:
        out.append(
            f"train.use_gpu with train.num_workers={t.num_workers}, but the cluster has "
            f"{cluster.gpus:g} GPU(s)"
        )
    if not cfg.text.enabled:
        return out
    ft = cfg.text.finetune
    if ft.enabled:
        need = ft.num_workers * ft.cpus_per_worker
        if need > cluster.cpus:
            out.append(
                f"text.finetune.num_workers={ft.num_workers} x cpus_per_worker="
                f"{ft.cpus_per_worker:g} = {need:g} CPUs, but the cluster has {cluster.cpus:g}"
            )
        if ft.use_gpu and ft.num_workers > cluster.gpus:
            out.append(
                f"text.finetune.use_gpu with num_workers={ft.num_workers}, but the cluster has "
                f"{cluster.gpus:g} GPU(s)"
            )
    e = cfg.text.embed
    actors = embed_actors(e, cluster)
    free = cluster.cpus - FEEDER_CPUS
    if e.num_gpus_per_actor > 0 and e.min_actors * e.num_gpus_per_actor > cluster.gpus:
        out.append(
            f"text.embed.min_actors={e.min_actors} x num_gpus_per_actor="
            f"{e.num_gpus_per_actor:g}, but the cluster has {cluster.gpus:g} GPU(s)"
        )
    if actors * e.cpus_per_actor > free:
        fit = _fits(actors, e.cpus_per_actor, free)
        out.append(
            f"text.embed.max_actors={actors} x cpus_per_actor={e.cpus_per_actor:g} = "
            f"{actors * e.cpus_per_actor:g} CPUs leaves fewer than {FEEDER_CPUS:g} of the "
            f"cluster's {cluster.cpus:g} CPUs for the read and tokenize tasks that feed the "
            f"actors, and the stage would wait forever; at most {fit} actor(s) of "
            f"{e.cpus_per_actor:g} CPU fit (torch threads per actor: text.embed.torch_threads)"
        )
    return out


def check_fits(cfg: Config, cluster: Cluster | None = None) -> None:
    """Raise `ResourceError` listing every part of `cfg` the cluster cannot run at once."""
    found = problems(cfg, cluster or Cluster.current())
    if found:
        raise ResourceError(
            "the config asks for more than this cluster can run at once:\n- " + "\n- ".join(found)
        )
