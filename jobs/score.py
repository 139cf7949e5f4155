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

from clvray.config import ConfigError, add_config_options, config_from_args
from clvray.model_run import ModelRunError, score_snapshot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-run", required=True, help="training run directory or s3:// URI")
    p.add_argument(
        "--as-of", default=None, help="score as of this date/time (UTC); default: end of data"
    )
    add_config_options(
        p,
        storage_help="where the scoring run goes (folder or s3://)",
        run_id_help="scoring run folder name",
        set_example="data.transactions=s3://b/tx",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config_from_args(args)
        summary = score_snapshot(args.model_run, cfg, as_of=args.as_of)
    except (ConfigError, ModelRunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
