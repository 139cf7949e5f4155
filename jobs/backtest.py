"""Rolling-origin backtest: `python jobs/backtest.py --config configs/online_retail.yaml --k 3`.

Runs the pipeline at K cutoffs (`--spacing-days` apart, default one horizon) and writes the
per-cutoff and pooled metrics to `<storage>/<prefix>/backtest.json`, and to `--out` when given
(`bench/results/backtest_<source>.json` for the README table, `bench/results.py --backtests`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from clvray.backtest import run_backtest
from clvray.config import ConfigError, add_config_options, config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_options(p, run_id_help=None)
    p.add_argument("--prefix", default=None, help="run id prefix of the cutoffs' runs")
    p.add_argument("--k", type=int, default=3, help="number of cutoffs")
    p.add_argument("--spacing-days", type=int, default=None, help="days between cutoffs")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of customers")
    p.add_argument("--out", default=None, help="also write the summary JSON here")
    p.add_argument(
        "--until", default=None, help="run each cutoff up to this stage (evaluate: no reports)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    summary = run_backtest(cfg, args.k, args.spacing_days, args.n_boot, args.prefix, args.until)
    text = json.dumps(summary, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for name, m in summary["pooled"].items():
        g, s = m["normalized_gini"], m["spearman"]
        print(
            f"{name:32s} Gini {g['estimate']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]  "
            f"Spearman {s['estimate']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"
        )
    for name, d in summary["vs_bgnbd"].items():
        g, s = d["normalized_gini"], d["spearman"]
        print(
            f"{name:32s} vs BG/NBD: dGini {g['estimate']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]  "
            f"dSpearman {s['estimate']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
