"""Multi-node behaviour on one machine: work spreads over nodes, and a node lost in the
middle of embedding costs no review and duplicates none."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _scenario(tmp_path, encoder: str, *flags: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.multinode_scenario", str(tmp_path), encoder, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**__import__("os").environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_ingest_embed_score_across_nodes_survives_node_removal(tmp_path, tiny_encoder):
    r = _scenario(tmp_path, tiny_encoder, "--remove-node")
    tx = r["counts"]["transactions"]
    assert tx["rows_in"] == tx["rows_accepted"] + tx["rows_rejected"]
    assert r["scored"] == r["scored_unique"] == r["customers"] > 0
    assert r["node_removed"] and r["alive_nodes"] == 2  # head + the remaining worker
    # every accepted review embedded exactly once, the lost node's work redone elsewhere
    assert r["embedded_rows"] == r["embedded_unique"] == r["reviews_accepted"] > 0
    assert r["embedded_match"]
    assert len(r["task_nodes"]) == 2  # both worker nodes ran tasks
