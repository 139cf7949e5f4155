"""Run the whole clvray job: `python jobs/pipeline.py --config configs/demo.yaml [--set k=v ...]`.

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from clvray.cluster import StorageNotSharedError, set_job_environment
from clvray.config import ConfigError, load_config
from clvray.pipeline import headline, run_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="YAML config (defaults in code when omitted)")
    p.add_argument(
        "--storage", default=None, help="run storage root: a folder or s3://bucket/prefix"
    )
    p.add_argument("--run-id", default=None, help="run folder name (default: hash of the config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set features.horizon_days=60 (repeatable)",
    )
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
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    set_job_environment()
    try:
        metrics = run_pipeline(cfg)
    except StorageNotSharedError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun directory: {metrics['run_dir']}")
    print(
        f"cutoff {metrics['cutoff']}, horizon {metrics['horizon_days']} days, "
        f"test customers {metrics['population'].get('evaluated_test_customers')}"
    )
    print(headline(metrics).to_string(float_format=lambda v: f"{v:.3f}"))
    print(json.dumps({"counts": metrics["counts"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
