"""A declared stage graph and the one runner that executes it.

A `Stage` names its inputs (other stages), the folders it writes under the run directory
(`outputs`), the config keys it reads (`sections`, dotted paths such as `score` or
`text.embed.dtype`) and a function of a `StageContext`. The `Runner` does everything else, the
same way for every stage:

- fingerprint: a hash of the stage's own config keys and its inputs' fingerprints, so a change
  re-runs that stage and what depends on it, nothing else;
- skip: a stage whose marker `<run>/_stages/<name>.json` holds its fingerprint is done;
- stage and commit: the function writes to its final paths through a `StagingStorage`, which
  puts the files under `<run>/_staging/<name>/`; only when the function returns (and every
  output that must hold rows does) are the folders moved into place and the marker written,
  last. The marker is deleted before a stage starts, so a killed job never leaves output that
  a re-run takes as done;
- time: the seconds a stage took live in its marker, so a stopped and resumed run still reports
  what every stage cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from clvray import observability
from clvray.config import Config
from clvray.io import count_rows, read_parquet
from clvray.storage import StagingStorage, Storage, join

log = logging.getLogger("clvray")

MARKERS = "_stages"
STAGING = "_staging"


class StageError(RuntimeError):
    """A stage cannot run or produced what it must not (no rows where rows are required)."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict | None]
    """Computes the outputs; returns what the marker should record (JSON)."""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    """Folders under the run directory this stage writes and commits."""
    sections: tuple[str, ...] = ()
    """Config keys (dotted) the stage reads: its fingerprint covers exactly these."""
    scratch: tuple[str, ...] = ()
    """Folders under the run directory the stage uses while it runs; staged, never committed."""
    require_rows: tuple[str, ...] = ()
    """Parquet folders (under the run directory) that must hold at least one row."""
    explain_empty: Callable[[StageContext, str], str] | None = None
    """Why a required folder is empty, in the user's terms (the data's range, the cutoff)."""
    resumable: bool = False
    """Keep the staging folder of a failed attempt (Ray Train resumes from its checkpoints)."""
    doc: str = ""


@dataclass
class StageContext:
    """What a stage function sees: the config, the run directory, a storage whose writes to
    the stage's outputs go to staging, its fingerprint and its inputs' marker records."""

    stage: Stage
    cfg: Config
    storage: Storage
    run_dir: str
    fingerprint: str
    runner: Runner

    def uri(self, *parts: str) -> str:
        return join(self.run_dir, *parts)

    def read(self, *parts: str, columns: list[str] | None = None):
        """A lazy Dataset over a parquet folder of the run (an input's or the stage's own)."""
        return read_parquet(self.uri(*parts), self.storage, columns=columns)

    def info(self, stage: str) -> dict:
        """The marker record of a finished stage (what its function returned, plus timing)."""
        return self.runner.marker(stage) or {}


def section_values(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """`{dotted key: JSON value}` for each key: a section, a subsection or a field."""
    tree = cfg.model_dump(mode="json")
    out = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def fingerprints(stages: list[Stage], cfg: Config) -> dict[str, str]:
    by_name = {s.name: s for s in stages}
    out: dict[str, str] = {}

    def fp(name: str) -> str:
        if name not in out:
            s = by_name[name]
            payload = {
                "stage": name,
                "config": section_values(cfg, s.sections),
                "inputs": {i: fp(i) for i in s.inputs},
            }
            text = json.dumps(payload, sort_keys=True, default=str)
            out[name] = hashlib.sha256(text.encode()).hexdigest()[:12]
        return out[name]

    for s in stages:
        fp(s.name)
    return out


def check_graph(stages: list[Stage]) -> None:
    """Every input is an earlier stage and no output folder belongs to two stages."""
    seen: set[str] = set()
    owner: dict[str, str] = {}
    for s in stages:
        for i in s.inputs:
            if i not in seen:
                raise StageError(f"stage {s.name}: input {i!r} is not an earlier stage")
        for o in s.outputs:
            if o in owner:
                raise StageError(f"output {o!r} written by both {owner[o]} and {s.name}")
            owner[o] = s.name
        seen.add(s.name)


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Runner:
    """Runs a list of stages (in dependency order) over one run directory."""

    def __init__(self, stages: list[Stage], cfg: Config, storage: Storage, run_dir: str):
        check_graph(stages)
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.cfg = cfg
        self.storage = storage
        self.run_dir = run_dir
        self.fingerprints = fingerprints(stages, cfg)

    # --- markers ---------------------------------------------------------------------------

    def marker_uri(self, stage: str) -> str:
        return join(self.run_dir, MARKERS, f"{stage}.json")

    def marker(self, stage: str) -> dict | None:
        uri = self.marker_uri(stage)
        if not self.storage.exists(uri):
            return None
        try:
            return self.storage.read_json(uri)
        except ValueError:  # a marker cut short by a kill: not done
            return None

    def done(self, stage: str) -> bool:
        m = self.marker(stage)
        return m is not None and m.get("fingerprint") == self.fingerprints[stage]

    def timings(self) -> dict[str, float]:
        """Seconds each stage took when it last ran (from the markers that match the config)."""
        out = {}
        for s in self.stages:
            m = self.marker(s.name)
            if m is not None and m.get("fingerprint") == self.fingerprints[s.name]:
                out[s.name] = m["seconds"]
        return out

    # --- selection and plan ----------------------------------------------------------------

    def ancestors(self, name: str) -> list[str]:
        if name not in self.by_name:
            raise StageError(f"no stage {name!r}; stages: {', '.join(self.by_name)}")
        wanted: set[str] = set()
        todo = [name]
        while todo:
            n = todo.pop()
            if n not in wanted:
                wanted.add(n)
                todo.extend(self.by_name[n].inputs)
        return [s.name for s in self.stages if s.name in wanted]

    def select(self, until: str | None = None, only: Iterable[str] | None = None) -> list[str]:
        """The stages a run considers: all, those `until` needs (itself included), or `only`."""
        names = [s.name for s in self.stages]
        if until is not None:
            names = self.ancestors(until)
        if only is not None:
            chosen = list(only)
            for n in chosen:
                if n not in self.by_name:
                    raise StageError(f"no stage {n!r}; stages: {', '.join(self.by_name)}")
            names = [n for n in names if n in chosen]
        return names

    def plan(self, until: str | None = None, only: Iterable[str] | None = None) -> list[dict]:
        """One row per selected stage: what it reads and whether a run would run it, and why."""
        names = self.select(until, only)
        will_run: set[str] = set()
        rows = []
        for name in names:
            s = self.by_name[name]
            m = self.marker(name)
            if self.done(name) and not (set(s.inputs) & will_run):
                status = "skip: done"
            else:
                will_run.add(name)
                if m is None:
                    status = "run: not run yet"
                elif set(s.inputs) & will_run:
                    status = "run: an input re-runs"
                else:
                    status = "run: config or input changed"
            rows.append(
                {
                    "stage": name,
                    "inputs": list(s.inputs),
                    "config": list(s.sections),
                    "outputs": list(s.outputs),
                    "status": status,
                    "fingerprint": self.fingerprints[name],
                }
            )
        return rows

    # --- running ---------------------------------------------------------------------------

    def run(self, until: str | None = None, only: Iterable[str] | None = None) -> RunResult:
        result = RunResult()
        names = self.select(until, only)
        for i, name in enumerate(names, 1):
            stage = self.by_name[name]
            prefix = f"[{i}/{len(names)}] {name}"
            if self.done(name) and not set(stage.inputs) & set(result.ran):
                result.skipped.append(name)
                seconds = (self.marker(name) or {}).get("seconds", 0.0)
                log.info("%s: done earlier (took %.1fs), skipped", prefix, seconds)
                continue
            for inp in stage.inputs:
                if not self.done(inp):
                    raise StageError(
                        f"stage {name} needs {inp}, which has not run with this config "
                        f"(run without `only`, or include {inp})"
                    )
            log.info("%s: running", prefix)
            seconds = self._run_stage(stage)
            observability.record_stage(name, seconds)
            log.info("%s: finished in %.1fs", prefix, seconds)
            result.ran.append(name)
        return result

    def _staging_uri(self, stage: Stage, folder: str) -> str:
        return join(self.run_dir, STAGING, stage.name.replace("/", "__"), folder)

    def _run_stage(self, stage: Stage) -> float:
        storage = self.storage
        self.storage.delete_file(self.marker_uri(stage.name))
        staging_root = join(self.run_dir, STAGING, stage.name.replace("/", "__"))
        if not stage.resumable:
            storage.delete_dir(staging_root)
        folders = (*stage.outputs, *stage.scratch)
        staged = StagingStorage(
            storage.endpoint_url,
            storage.region,
            redirects=tuple(
                (join(self.run_dir, f), self._staging_uri(stage, f))
                # longest first, so `text/x/features` wins over a `text/x` prefix
                for f in sorted(folders, key=len, reverse=True)
            ),
        )
        ctx = StageContext(
            stage, self.cfg, staged, self.run_dir, self.fingerprints[stage.name], self
        )
        start = time.perf_counter()
        info = stage.run(ctx) or {}
        for folder in stage.require_rows:
            if count_rows(join(self.run_dir, folder), staged) == 0:
                why = stage.explain_empty(ctx, folder) if stage.explain_empty else ""
                raise StageError(
                    f"stage {stage.name} wrote no rows to {folder}" + (f": {why}" if why else "")
                )
        seconds = round(time.perf_counter() - start, 2)
        # Commit: outputs into place, then the marker (last: its presence means complete).
        for folder in stage.outputs:
            storage.move_dir(self._staging_uri(stage, folder), join(self.run_dir, folder))
        storage.delete_dir(staging_root)
        storage.write_json(
            self.marker_uri(stage.name),
            {
                "stage": stage.name,
                "fingerprint": self.fingerprints[stage.name],
                "seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **info,
            },
        )
        return seconds


def compact_keys(keys: Iterable[str]) -> str:
    """`a.b.x, a.b.y, c` -> `a.b.{x, y}, c`: config keys grouped by their section."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    parts = []
    for parent, leaves in groups.items():
        if not parent:
            parts += leaves
        elif len(leaves) == 1:
            parts.append(f"{parent}.{leaves[0]}")
        else:
            parts.append(f"{parent}.{{{', '.join(leaves)}}}")
    return ", ".join(parts) or "-"


def format_plan(rows: list[dict], run_dir: str) -> str:
    """The plan as text (what `jobs/pipeline.py --plan` prints): per stage its status, then
    the stages it reads and the config keys it depends on."""
    import textwrap

    width = max(len(r["stage"]) for r in rows)
    lines = [f"run directory: {run_dir}", ""]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}  {r['status']}")
        for label, text in (
            ("after", ", ".join(r["inputs"])),
            ("config", compact_keys(r["config"])),
        ):
            if text and text != "-":
                lines += textwrap.wrap(
                    f"{label}: {text}",
                    width=96,
                    initial_indent="    ",
                    subsequent_indent="        ",
                    break_on_hyphens=False,
                )
    return "\n".join(lines)
