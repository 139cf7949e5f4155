"""The HTML report: sections, numbers, escaping, curves, and a real render in headless Chromium.

Unit tests run on a small synthetic run (no Ray). The Chromium test loads the written page from
disk the way a user would and checks the DOM and a screenshot; it is skipped only where
`/usr/bin/chromium` is absent (CI installs it with `apt-get install -y chromium`).
"""

from __future__ import annotations

import html
import math
import subprocess
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from clvray import metrics as m
from clvray.report import (
    CHART_SECTION_IDS,
    SECTION_IDS,
    format_number,
    render_report,
    roc_points,
    sample_explanations,
    write_report,
)
from clvray.storage import Storage

EVIL = '<script>alert("x")</script>'
PRIMARY = "gbm_text_finetuned"
CHROMIUM = Path("/usr/bin/chromium")

# The precision the report promises for each column of the metrics table.
DIGITS = {
    "normalized_gini": 3,
    "spearman": 3,
    "decile_mape": 3,
    "rmse": 2,
    "mae": 2,
    "top_decile_value_share": 3,
    "roc_auc": 3,
    "pr_auc": 3,
    "log_loss": 3,
    "interval_coverage": 3,
}
GROUP = {k: "value" for k in list(DIGITS)[:6]} | {k: "churn" for k in list(DIGITS)[6:9]}


def _value(gini: float, rmse: float | None = 41.2345) -> dict:
    return {
        "normalized_gini": gini,
        "spearman": gini - 0.2,
        "decile_mape": 0.31416,
        "rmse": rmse,
        "mae": 17.0049,
        "top_decile_value_share": 0.5123,
        "n": 400,
    }


def _churn(auc: float | None) -> dict:
    return {"roc_auc": auc, "pr_auc": 0.9012, "log_loss": 0.41234, "brier": 0.13, "n": 400}


def synthetic_inputs() -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A run of 400 test customers, four models, a failed baseline and a hostile model name."""
    rng = np.random.default_rng(7)
    n = 400
    alive = rng.random(n) < 0.35
    value = np.where(alive, rng.lognormal(3.0, 1.0, n), 0.0)
    test_frame = pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(n)],
            "future_value": value,
            "churned": (~alive).astype(int),
        }
    )
    for name, noise in [("gbm_behavioural", 0.9), (PRIMARY, 0.6), (EVIL, 1.5)]:
        test_frame[f"pred_value__{name}"] = value * rng.lognormal(0, noise, n) + rng.exponential(
            4.0, n
        )
        test_frame[f"pred_churn__{name}"] = np.clip(
            0.65 - 0.4 * alive + rng.normal(0, noise / 4, n), 0.01, 0.99
        ).round(2)
    test_frame["pred_value__heuristic"] = value * 0.8 + rng.exponential(10.0, n)

    models = {
        "gbm_behavioural": {
            "value": _value(0.61),
            "churn": _churn(0.801),
            "interval_coverage": 0.7912,
            "feature_importance": {f"feature_{i:02d}": float(100 - 3 * i) for i in range(25)},
        },
        PRIMARY: {
            "value": _value(0.7351, rmse=38.005),
            "churn": _churn(0.8456),
            "interval_coverage": 0.8049,
            "feature_importance": {f"feature_{i:02d}": float(100 - 3 * i) for i in range(25)},
        },
        "heuristic": {"value": {**_value(0.4), "decile_mape": math.nan}},
        "bgnbd_gamma_gamma": {"error": "RuntimeError: did not converge <a>"},
        EVIL: {"value": _value(0.2), "churn": _churn(None)},
    }
    metrics = {
        "run_dir": "s3://bucket/runs/synthetic-abc",
        "source": "synthetic",
        "cutoff": "2023-10-01T00:00:00+00:00",
        "horizon_days": 90,
        "primary_model": PRIMARY,
        "population": {
            "customers": 2000,
            "train": 1200,
            "valid": 400,
            "test": 400,
            "evaluated_test_customers": 400,
            "test_churn_rate": 0.65,
        },
        "counts": {
            "transactions": {
                "rows_in": 12600,
                "rows_accepted": 12590,
                "rows_rejected": 10,
                "rejects_by_reason": {"negative_quantity": 7, "bad_timestamp": 3},
            },
            "reviews": {
                "rows_in": 4277,
                "rows_accepted": 4277,
                "rows_rejected": 0,
                "rejects_by_reason": {},
            },
        },
        "ablation": {
            "gbm_behavioural": {"normalized_gini": 0.61, "spearman": 0.41, "churn_roc_auc": 0.8},
            "gbm_text_pretrained": {"normalized_gini": 0.66, "spearman": 0.45},
            PRIMARY: {"normalized_gini": 0.7351, "spearman": 0.5, "churn_roc_auc": 0.85},
        },
        "topics": {
            "variant": PRIMARY,
            "churn_threshold": 0.5,
            "topics": [
                {
                    "topic": 0,
                    "words": ["refund", "broken"],
                    "reviews": 600,
                    "share": 0.6,
                    "churner_lift": 1.4,
                    "top_value_lift": 0.5,
                },
                {
                    "topic": 1,
                    "words": ["love", "<again>"],
                    "reviews": 400,
                    "share": 0.4,
                    "churner_lift": 0.4,
                    "top_value_lift": None,
                },
            ],
        },  # fmt: skip
        "models": models,
        "timings_s": {"ingest": 3.2, "train/gbm_behavioural": 26.94, "evaluate": 11.7},
        "skipped_stages": ["features"],
    }

    primary_pred = test_frame[f"pred_value__{PRIMARY}"].to_numpy()
    scores = pd.DataFrame(
        {
            "customer_id": test_frame["customer_id"],
            "future_value_pred": primary_pred,
            "churn_prob": test_frame[f"pred_churn__{PRIMARY}"],
            "value_p10": primary_pred * 0.3,
            "value_p50": primary_pred * 0.9,
            "value_p90": primary_pred * 2.0,
            "value_segment": np.searchsorted(
                np.quantile(primary_pred, np.linspace(0, 1, 11)[1:-1]), primary_pred
            )
            + 1,
        }
    )
    for k in (1, 2, 3):
        scores[f"top_feature_{k}"] = [f"feature_{(i + k) % 7:02d}" for i in range(n)]
        scores[f"top_contrib_{k}"] = rng.normal(0, 1, n)
    segments = (
        scores.assign(churned=test_frame["churned"])
        .groupby("value_segment")
        .agg(
            customers=("customer_id", "size"),
            predicted=("future_value_pred", "sum"),
            churn_rate=("churned", "mean"),
        )
        .reset_index()
    )
    segments["share_of_predicted_value"] = segments["predicted"] / segments["predicted"].sum()
    return metrics, scores, test_frame, segments.drop(columns="predicted")


class _PageParser(HTMLParser):
    """Records, per element with an `id` in SECTION_IDS, the tags inside it and their attributes;
    also every metrics-table cell by (model, metric)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, Counter] = defaultdict(Counter)
        self.attrs: dict[str, list[dict]] = defaultdict(list)
        self.text: dict[str, list[str]] = defaultdict(list)
        self.cells: dict[tuple[str, str], str] = {}
        self._open: list[tuple[str, str]] = []  # (tag, section id) of open sections
        self._cell: tuple[str, str] | None = None

    @property
    def section(self) -> str | None:
        return self._open[-1][1] if self._open else None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id") in SECTION_IDS:
            self._open.append((tag, a["id"]))
        if self.section:
            self.tags[self.section][tag] += 1
            self.attrs[self.section].append({"tag": tag, **a})
        if "data-metric" in a:
            self._cell = (a["data-model"], a["data-metric"])
            self.cells[self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self._open.pop()
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self.section:
            self.text[self.section].append(data)
        if self._cell:
            self.cells[self._cell] += data


def parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def inputs():
    return synthetic_inputs()


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory) -> tuple[str, str]:
    """(URI, text) of the report written through Storage into a temporary run directory."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    uri = write_report(*inputs, run_dir=run_dir, storage=Storage())
    return uri, Path(uri).read_text(encoding="utf-8")


def test_written_under_run_dir_report(report) -> None:
    uri, page = report
    assert uri.endswith("/report/index.html")
    assert page.startswith("<!DOCTYPE html>")
    # The header names the directory the report was written for, not the one in metrics.json.
    assert str(Path(uri).parents[1]) in parse(page).text["summary"]


def test_every_section_present_and_every_chart_drawn(report) -> None:
    page = parse(report[1])
    assert set(SECTION_IDS) <= set(page.tags)
    for sid in CHART_SECTION_IDS:
        assert page.tags[sid]["svg"] + page.tags[sid]["img"] >= 1, sid
        assert page.tags[sid]["polyline"] + page.tags[sid]["rect"] >= 2, sid
    # Every input is present, so no section fell back to its "nothing to show" note.
    empties = {
        sid for sid, attrs in page.attrs.items() if any(a.get("class") == "empty" for a in attrs)
    }
    assert empties == set()


def test_metrics_table_shows_the_dict_values_at_fixed_precision(inputs, report) -> None:
    metrics = inputs[0]
    cells = parse(report[1]).cells
    checked = Counter()
    for name, model in metrics["models"].items():
        for key, digits in DIGITS.items():
            holder = model.get(GROUP[key], {}) if key in GROUP else model
            value = holder.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            expected = "–" if missing else f"{value:.{digits}f}"
            assert cells[(name, key)] == expected, (name, key)
            checked[missing] += 1
    assert cells[(PRIMARY, "rmse")] == "38.01"
    assert cells[("heuristic", "decile_mape")] == "–"  # NaN
    assert cells[("heuristic", "roc_auc")] == "–"  # value-only baseline
    assert cells[(EVIL, "roc_auc")] == "–"  # null in metrics.json
    assert checked[True] >= 15 and checked[False] >= 30


def test_text_is_escaped(report) -> None:
    page = report[1]
    assert EVIL not in page
    assert "<script" not in page.lower()
    assert html.escape(EVIL) in page
    assert "did not converge &lt;a&gt;" in page
    parsed = parse(page)
    # The hostile name still reaches the table and the legends, as text.
    assert (EVIL, "normalized_gini") in parsed.cells
    drawn = {a.get("data-series") for a in parsed.attrs["gain-chart"]}
    assert any(s and s.startswith(EVIL) for s in drawn)


def test_charts_draw_one_line_per_model_with_predictions(report) -> None:
    attrs = parse(report[1]).attrs

    def series(sid: str) -> set[str]:
        return {a["data-series"].split(" (")[0] for a in attrs[sid] if "data-series" in a}

    value_models = {"gbm_behavioural", PRIMARY, EVIL, "heuristic"}
    churn_models = {"gbm_behavioural", PRIMARY, EVIL}
    assert series("gain-chart") == value_models | {"perfect ordering", "random"}
    # Calibration: primary and baselines only; other GBM variants are in the ablation table.
    assert series("calibration-chart") == {PRIMARY, EVIL, "heuristic", "perfect calibration"}
    assert series("roc-chart") == churn_models | {"random"}
    assert series("reliability-chart") == churn_models | {"perfect calibration"}
    bars = [a for a in attrs["importance-chart"] if a["tag"] == "rect"]
    assert len(bars) == 20  # top 20 of 25 features


def test_ablation_segments_counts_and_timings_tables(report) -> None:
    parsed = parse(report[1])
    text = {sid: " ".join(" ".join(parsed.text[sid]).split()) for sid in SECTION_IDS}
    assert "gbm_text_pretrained 0.660 +0.050" in text["ablation"]
    assert "gbm_text_finetuned 0.735 +0.125" in text["ablation"]
    assert "0 refund, broken 600 60.0% 1.40× 0.50×" in text["topics"]
    assert "1 love, <again> 400 40.0% 0.40× –" in text["topics"]  # escaped, parsed back
    assert "all 400 100.0%" in text["segments"]
    assert "transactions 12,600 12,590 10 0.08%" in text["counts"]
    assert "negative_quantity 7" in text["counts"]
    assert "total 41.8" in text["timings"]
    assert "features" in text["timings"]


def test_roc_points_match_sklearn_and_integrate_to_roc_auc() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.3).astype(int)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.25, 500), 0, 1).round(1)  # many ties
    fpr, tpr = roc_points(y, p)
    ref_fpr, ref_tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(m.roc_auc(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="single class"):
        roc_points(np.ones(5), np.linspace(0, 1, 5))


def test_explanations_spread_from_highest_to_lowest(inputs, report) -> None:
    scores = inputs[1]
    sample = sample_explanations(scores, 20)
    assert len(sample) == 20
    assert sample["future_value_pred"].iloc[0] == scores["future_value_pred"].max()
    assert sample["future_value_pred"].iloc[-1] == scores["future_value_pred"].min()
    assert sample["future_value_pred"].is_monotonic_decreasing
    tags = parse(report[1]).tags["explanations"]
    assert tags["tr"] == 21  # header + 20 customers


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (0.12345, 3, "0.123"),
        (-0.0004, 3, "0.000"),
        (-1.5, 1, "-1.5"),
        (None, 2, "–"),
        (math.nan, 2, "–"),
        (math.inf, 2, "–"),
        ("0.5", 2, "–"),
        (True, 2, "–"),
        (7, 2, "7.00"),
    ],
)
def test_format_number(value, digits, text) -> None:
    assert format_number(value, digits) == text


def test_missing_column_fails_at_the_door(inputs) -> None:
    metrics, scores, test_frame, segments = inputs
    with pytest.raises(ValueError, match=r"test_frame lacks required column\(s\) \['churned'\]"):
        render_report(metrics, scores, test_frame.drop(columns="churned"), segments)
    with pytest.raises(ValueError, match=r"segments lacks required column\(s\) \['churn_rate'\]"):
        render_report(metrics, scores, test_frame, segments.drop(columns="churn_rate"))


def test_degrades_to_notes_without_predictions(inputs) -> None:
    metrics, scores, test_frame, segments = inputs
    bare = test_frame[["customer_id", "future_value", "churned"]]
    page = parse(render_report({**metrics, "ablation": {}}, scores, bare, segments))
    for sid in ("gain-chart", "calibration-chart", "roc-chart", "reliability-chart", "ablation"):
        assert page.tags[sid]["svg"] == 0
        assert any(a.get("class") == "empty" for a in page.attrs[sid]), sid


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium absent (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    from PIL import Image

    url = Path(report[0]).as_uri()
    base = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    page = parse(dom)
    assert set(SECTION_IDS) <= set(page.tags), dom[:500]
    for sid in CHART_SECTION_IDS:
        assert page.tags[sid]["svg"] + page.tags[sid]["img"] >= 1, sid

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1400,6000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as img:
        assert img.size == (1400, 6000)
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.reshape(-1, 3).std(axis=0).max() > 10  # not a blank single-colour page
    # The importance bars are solid rectangles of the primary chart colour (#0072B2): seeing
    # thousands of those pixels means the SVG charts were laid out and painted.
    assert int(np.all(rgb == (0x00, 0x72, 0xB2), axis=-1).sum()) > 5_000
