"""Run the whole clvray job: `python jobs/pipeline.py --config configs/demo.yaml [--set k=v ...]`.

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local Ray.
`--plan` prints the stage graph and what a run would do, and runs nothing; `--until STAGE`
and `--only STAGE` (repeatable) run a slice of the graph.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clvray.cluster import StorageNotSharedError, set_job_environment
from clvray.config import ConfigError, add_config_options, config_from_args
from clvray.graph import StageError
from clvray.ingest import INPUT_ERRORS
from clvray.pipeline import headline, plan, run_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_options(p)
    p.add_argument("--plan", action="store_true", help="print the stage graph and what would run")
    p.add_argument("--until", default=None, help="run this stage and what it needs, then stop")
    p.add_argument("--only", action="append", default=None, help="run only this stage (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The terminal shows clvray's stage lines; Ray's own records go to <run_dir>/logs/ray.log.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("clvray").setLevel(logging.INFO)
    try:
        cfg = config_from_args(args)
        if args.plan:
            print(plan(cfg, args.until, args.only))
            return 0
        set_job_environment()
        metrics = run_pipeline(cfg, until=args.until, only=args.only)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except StorageNotSharedError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2
    except INPUT_ERRORS as exc:  # bad input or config vs data: the message says what and where
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"stage failed: {exc}", file=sys.stderr)
        return 1
    print(f"\nrun directory: {metrics['run_dir']}")
    if "models" not in metrics:
        print(f"ran {metrics['ran_stages']}, skipped {metrics['skipped_stages']}")
        return 0
    print(
        f"cutoff {metrics['cutoff']}, horizon {metrics['horizon_days']} days, "
        f"test customers {metrics['population'].get('evaluated_test_customers')}"
    )
    print(headline(metrics).to_string(float_format=lambda v: f"{v:.3f}"))
    if metrics.get("report"):
        print(f"report: {metrics['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
