"""Generate synthetic customers: `python jobs/generate.py --out s3://bucket/synth [--set ...]`.

Writes `transactions/`, `reviews/` and the latent ground truth `truth/` as parquet, one file
per Ray task; uses the `data.synthetic` section of the config.
"""

from __future__ import annotations

import argparse
import json
import sys

from clvray.config import ConfigError, load_config
from clvray.pipeline import connect_ray
from clvray.storage import Storage, join
from clvray.synth import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    connect_ray(cfg)
    storage = Storage(cfg.s3.endpoint_url, cfg.s3.region)
    counts = generate(cfg.data.synthetic, args.out, storage)
    storage.write_json(join(args.out, "_SUCCESS.json"), counts)
    print(json.dumps({"out": args.out, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
