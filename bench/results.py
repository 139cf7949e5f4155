"""Results table for README.md: every model on every data set, from the pipeline's own metrics.

    python bench/results.py [--datasets synthetic,amazon,online_retail] [--storage runs/bench]

Runs `jobs/pipeline.py` once per data set (a separate process and Ray each), reads each run's
metrics.json, writes `bench/results.md` and replaces the block between the `results` markers
in README.md. Nothing here is typed by hand: rerun it to refresh the table.

    python bench/results.py --backtests

reads every `bench/results/backtest_<source>.json` written by `jobs/backtest.py --out` and
replaces the block between the `backtest` markers in README.md with the pooled table (K, the
spacing and the horizon stated), the paired differences against BG/NBD + Gamma-Gamma and the
behavioural GBM, the text lift and the interval coverage per value segment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "synthetic": "configs/demo.yaml",
    "amazon": "configs/amazon.yaml",
    "online_retail": "configs/online_retail.yaml",
}
MODELS = [
    "heuristic",
    "bgnbd_gamma_gamma",
    "gbm_behavioural",
    "gbm_text_pretrained",
    "gbm_text_finetuned",
    "oracle",
]
START, END = "<!-- results:start -->", "<!-- results:end -->"
BT_START, BT_END = "<!-- backtest:start -->", "<!-- backtest:end -->"
BACKTESTS = REPO / "bench" / "results"


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def hardware() -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.common import describe, machine

    return describe(machine())


def run_dataset(name: str, storage: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "jobs/pipeline.py",
        "--config",
        CONFIGS[name],
        "--storage",
        storage,
        *extra,
    ]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    run_dir = re.search(r"run directory: (\S+)", out.stdout).group(1)
    return json.loads(Path(run_dir, "metrics.json").read_text())


def table(results: dict[str, dict]) -> str:
    lines = [
        "| data set | cutoff | horizon | test customers | model | normalized Gini | Spearman | decile MAPE | churn ROC-AUC | P10-P90 coverage |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        for model in MODELS:
            if model not in m["models"]:
                continue
            r = m["models"][model]
            if "error" in r:
                lines.append(f"| {name} | | | | {model} | failed: {r['error'][:60]} | | | | |")
                continue
            v, c = r.get("value", {}), r.get("churn", {})
            lines.append(
                f"| {name} | {m['cutoff'][:10]} | {m['horizon_days']} d | {m['population']['evaluated_test_customers']} | {model} "
                f"| {_fmt(v.get('normalized_gini'))} | {_fmt(v.get('spearman'))} | {_fmt(v.get('decile_mape'))} "
                f"| {_fmt(c.get('roc_auc'))} | {_fmt(r.get('interval_coverage'))} |"
            )
    return "\n".join(lines)


def _delta(d: dict | None) -> str:
    if not d:
        return "–"
    verdict = "better" if d["delta"] > 0 else "worse"
    if d["lo"] < 0 < d["hi"]:
        verdict += ", within noise"
    return f"{d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({verdict})"


def comparison(results: dict[str, dict]) -> str:
    """Every GBM against BG/NBD + Gamma-Gamma on the same test customers, with the paired
    bootstrap 95% interval of the difference (metrics.json `vs_bgnbd`)."""
    lines = [
        "| data set | model | Δ normalized Gini vs BG/NBD + GG [95% CI] | Δ Spearman vs BG/NBD + GG [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, m in results.items():
        for model, d in (m.get("vs_bgnbd") or {}).items():
            lines.append(
                f"| {name} | {model} | {_delta(d.get('normalized_gini'))} | {_delta(d.get('spearman'))} |"
            )
    return "\n".join(lines)


def _ci(d: dict | None) -> str:
    if not d or d.get("estimate") is None:
        return "–"
    return f"{d['estimate']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _diff(d: dict | None) -> str:
    if not d or d.get("estimate") is None:
        return "–"
    verdict = "better" if d["estimate"] > 0 else "worse"
    verdict += ", within noise" if d["lo"] <= 0 <= d["hi"] else ", interval excludes 0"
    return f"{d['estimate']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({verdict})"


def backtest_tables(summaries: dict[str, dict]) -> str:
    """Markdown of every backtest summary (`clvray.backtest.run_backtest`)."""
    out = []
    head = [
        "| data set | K | spacing | horizon | cutoffs | test customers | model | Gini [95% CI] | Spearman [95% CI] | churn ROC-AUC [95% CI] | P10-P90 coverage (per segment min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += head
    for name, s in summaries.items():
        n = sum(r["test_customers"] for r in s["per_cutoff"])
        cut = ", ".join(c[:10] for c in s["cutoffs"])
        for model, m in s["pooled"].items():
            cov = "–"
            if "interval_coverage" in m:
                segs = [r["coverage"] for r in m["interval_coverage_by_segment"]]
                cov = f"{m['interval_coverage']:.3f} ({min(segs):.2f}-{max(segs):.2f})"
            out.append(
                f"| {name} | {s['k']} | {s['spacing_days']} d | {s['horizon_days']} d | {cut} | {n} "
                f"| {model} | {_ci(m.get('normalized_gini'))} | {_ci(m.get('spearman'))} "
                f"| {_ci(m.get('churn_roc_auc'))} | {cov} |"
            )
    out += [
        "",
        "Paired differences pooled over the cutoffs (same customer resample for both models):",
        "",
        "| data set | model | against | Δ Gini [95% CI] | Δ Spearman [95% CI] | Δ churn ROC-AUC [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        for against, key in (
            ("BG/NBD + GG", "vs_bgnbd"),
            ("gbm_behavioural", "vs_behavioural"),
            ("gbm_behavioural (text lift)", "text_lift"),
        ):
            for model, d in (s.get(key) or {}).items():
                out.append(
                    f"| {name} | {model} | {against} | {_diff(d.get('normalized_gini'))} "
                    f"| {_diff(d.get('spearman'))} | {_diff(d.get('churn_roc_auc'))} |"
                )
    rel = [
        (name, r["cutoff"], r["relbench_churn"])
        for name, s in summaries.items()
        for r in s["per_cutoff"]
        if r.get("relbench_churn")
    ]
    if rel:
        out += [
            "",
            "RelBench `rel-amazon` user-churn protocol (active in the previous 91 days; churn = "
            "no review in the next 91 days; AUROC) on the same test customers:",
            "",
            "| data set | cutoff | models' horizon | active customers | churn rate | AUROC per model |",
            "|---|---|---|---|---|---|",
        ]
        for name, cutoff, r in rel:
            aucs = ", ".join(f"{k} {v:.3f}" for k, v in r["roc_auc"].items() if v is not None)
            rate = "–" if r["churn_rate"] is None else f"{r['churn_rate']:.2f}"
            out.append(
                f"| {name} | {cutoff[:10]} | {r['horizon_days_of_models']} d | {r['customers']} "
                f"| {rate} | {aucs} |"
            )
    return "\n".join(out)


def write_backtest_block() -> str:
    summaries = {
        p.stem.removeprefix("backtest_"): json.loads(p.read_text())
        for p in sorted(BACKTESTS.glob("backtest_*.json"))
    }
    body = (
        "Generated by `python bench/results.py --backtests` from `bench/results/backtest_*.json` "
        "(written by `jobs/backtest.py --out`). Each data set: K cutoffs going back from the "
        "latest one by the spacing, every model and baseline refitted at each cutoff; numbers "
        "are the mean over cutoffs of the test-split metric with a 95% bootstrap interval that "
        "resamples customers. `@tweedie` / `@hurdle`: both value models of `value_model: auto`, "
        "the unsuffixed name is the one chosen on the valid split.\n\n"
        + backtest_tables(summaries)
        + "\n"
    )
    readme = REPO / "README.md"
    text = readme.read_text()
    if BT_START in text and BT_END in text:
        head, rest = text.split(BT_START, 1)
        readme.write_text(head + BT_START + "\n" + body + BT_END + rest.split(BT_END, 1)[1])
    return body


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--datasets", default="synthetic,amazon,online_retail")
    p.add_argument("--storage", default="runs/bench")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--backtests", action="store_true", help="README table from bench/results/backtest_*.json"
    )
    args = p.parse_args()
    if args.backtests:
        print(write_backtest_block())
        return 0
    extra = [a for o in args.overrides for a in ("--set", o)]
    results = {}
    for name in args.datasets.split(","):
        results[name] = run_dataset(name, args.storage, extra)
        timings = results[name].get("timings_s", {})
        print(f"{name}: done, stage seconds {timings}", flush=True)
    body = (
        f"Produced by `python bench/results.py` on {dt.date.today()}, {hardware()}. "
        "Metrics on the test customers (stable hash split, 20%); value = net spend (Online Retail, "
        "synthetic) or purchases (Amazon) in the horizon after the cutoff. `oracle` knows the "
        "synthetic generator's latent state (the best possible).\n\n"
        + table(results)
        + "\n\nThe GBMs against the standard buy-till-you-die pair, difference on the same test "
        "customers with a paired bootstrap 95% interval (500 resamples of customers): an "
        "interval that contains 0 means this test split cannot tell the two apart.\n\n"
        + comparison(results)
        + "\n"
    )
    (REPO / "bench" / "results.md").write_text(body)
    readme = REPO / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + body + END + rest.split(END, 1)[1])
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
