"""Score a new data snapshot with a finished training run (nothing is refitted):

    python jobs/score.py --model-run runs/synthetic-abc123 --config configs/score.yaml \
        [--as-of 2024-01-01] [--set k=v ...]

The config says where the snapshot is (`data`), where the scores go (`run.storage`,
`run.run_id`) and the Ray resources; the contract, feature settings and every fitted thing come
from the model run. Connects to RAY_ADDRESS (set by `ray job submit`) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from clvray.config import ConfigError, load_config
from clvray.model_run import ModelRunError, score_snapshot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-run", required=True, help="training run directory or s3:// URI")
    p.add_argument(
        "--as-of", default=None, help="score as of this date/time (UTC); default: end of data"
    )
    p.add_argument("--config", default=None, help="YAML config: the snapshot, storage, resources")
    p.add_argument("--storage", default=None, help="where the scoring run goes (folder or s3://)")
    p.add_argument("--run-id", default=None, help="scoring run folder name")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.transactions=s3://b/tx (repeatable)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"run.storage={args.storage}")
    if args.run_id:
        overrides.append(f"run.run_id={args.run_id}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        summary = score_snapshot(args.model_run, cfg, as_of=args.as_of)
    except (ConfigError, ModelRunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
