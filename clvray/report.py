"""A static HTML report of one run: metrics, charts and tables in one self-contained page.

`render_report` turns plain data (the metrics dict written to `metrics.json` and three small
pandas frames) into one HTML string; `write_report` writes it to `<run_dir>/report/index.html`
through `Storage`, so local paths and `s3://` work alike. The page opens from disk: charts are
inline SVG drawn here from numpy arrays (no plotting library, no JavaScript, no fonts or
stylesheets fetched), and a Content-Security-Policy forbids scripts and network loads outright.
Every piece of text taken from the data is HTML-escaped.

Each section carries a stable `id` (`SECTION_IDS`) that tests and links rely on; the sections in
`CHART_SECTION_IDS` always hold an `<svg>` when there is data to draw, else a short note saying
what is missing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clvray import metrics as m
from clvray.contract import require_columns
from clvray.storage import Storage, join

MISSING = "–"
"""Shown for a metric that a model does not have or that is undefined (NaN / null)."""

PRED_VALUE_PREFIX = "pred_value__"
PRED_CHURN_PREFIX = "pred_churn__"
TEXT_ABLATION = ("gbm_behavioural", "gbm_text_pretrained", "gbm_text_finetuned")

CHART_SECTION_IDS = (
    "gain-chart",
    "calibration-chart",
    "roc-chart",
    "reliability-chart",
    "importance-chart",
)
SECTION_IDS = (
    "summary",
    "metrics-table",
    *CHART_SECTION_IDS,
    "ablation",
    "topics",
    "segments",
    "explanations",
    "counts",
    "timings",
)

TEST_FRAME_COLUMNS = ("customer_id", "future_value", "churned")
SCORES_COLUMNS = ("customer_id", "future_value_pred", "churn_prob", "value_segment")
SEGMENTS_COLUMNS = ("value_segment", "customers", "share_of_predicted_value", "churn_rate")

MAX_ROC_POINTS = 400
"""ROC vertices kept per model; beyond that the curve is thinned evenly (page size stays flat)."""
TOP_FEATURES = 20

# Okabe-Ito, colour-blind safe; a model keeps its colour in every chart.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#D55E00",
    "#56B4E9",
    "#8C6D1F",
    "#7F3C8D",
    "#3B7D23",
    "#B22222",
)


@dataclass(frozen=True)
class MetricColumn:
    group: str | None  # "value", "churn" or None for a top-level key of the model's dict
    key: str
    label: str
    digits: int


METRIC_COLUMNS = (
    MetricColumn("value", "normalized_gini", "Normalized Gini", 3),
    MetricColumn("value", "spearman", "Spearman", 3),
    MetricColumn("value", "decile_mape", "Decile MAPE", 3),
    MetricColumn("value", "rmse", "RMSE", 2),
    MetricColumn("value", "mae", "MAE", 2),
    MetricColumn("value", "top_decile_value_share", "Top-decile share", 3),
    MetricColumn("churn", "roc_auc", "ROC-AUC", 3),
    MetricColumn("churn", "pr_auc", "PR-AUC", 3),
    MetricColumn("churn", "log_loss", "Log loss", 3),
    MetricColumn(None, "interval_coverage", "Interval coverage p10–p90", 3),
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_number(value: object, digits: int) -> str:
    """Fixed-point with `digits` decimals; `MISSING` for None, NaN, infinities and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return MISSING
    v = float(value)
    if not math.isfinite(v):
        return MISSING
    text = f"{v:.{digits}f}"
    # -0.001 at 2 decimals reads "-0.00": a sign on a zero is noise.
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def _percent(value: object, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return MISSING
    return f"{float(value) * 100:.{digits}f}%" if math.isfinite(float(value)) else MISSING


def _count(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return MISSING
    return f"{int(value):,}" if math.isfinite(float(value)) else MISSING


def _require(frame: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    require_columns(frame.columns, columns, f"report: {name}")


# --------------------------------------------------------------------------------------------
# Curves (numpy)


def roc_points(y_true: object, prob: object) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve `(fpr, tpr)` from (0, 0) to (1, 1), one vertex per distinct score.

    Customers sorted by `prob`, highest first; tied scores enter together, so the curve runs
    diagonally through a tie group and its trapezoid area equals `metrics.roc_auc` (ties 1/2).
    Raises `ValueError` when `y_true` holds a single class (the curve is undefined).
    """
    y, p = m._binary(y_true, prob)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("y_true holds a single class: ROC curve undefined")
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    last_of_group = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])
    tp = np.cumsum(ys)[last_of_group]
    fp = (last_of_group + 1.0) - tp
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= max_points:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(int))
    return x[idx], y[idx]


def sample_explanations(scores: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """`n` customers spread evenly over the ranking by predicted value, highest first.

    Evenly spaced rather than random, so the sample always shows the top, the middle and the
    tail, and the same scores give the same page.
    """
    if scores.empty or n <= 0:
        return scores.iloc[:0]
    ranked = scores.sort_values(
        ["future_value_pred", "customer_id"], ascending=[False, True], kind="stable"
    )
    idx = np.unique(np.linspace(0, len(ranked) - 1, min(n, len(ranked))).round().astype(int))
    return ranked.iloc[idx].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# SVG charts


@dataclass
class Series:
    name: str
    x: np.ndarray
    y: np.ndarray
    color: str
    dash: str | None = None
    markers: bool = False
    width: float = 2.0


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * mag:
            return mult * mag
    return 10 * mag


def _axis(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """Round limits outwards to a nice step and return `(lo, hi, ticks)`."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = (lo - 0.5, hi + 0.5) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    step = _nice_step(hi - lo, target)
    lo = math.floor(lo / step + 1e-9) * step
    hi = math.ceil(hi / step - 1e-9) * step
    ticks = [lo + i * step for i in range(round((hi - lo) / step) + 1)]
    return lo, hi, ticks


def _tick_label(step: float) -> Callable[[float], str]:
    exponent = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -exponent)
    if exponent <= 0 and round(step / 10**exponent, 6) == 2.5:
        decimals += 1  # 0.25, 2.5: one more decimal than the magnitude says
    return lambda v: f"{v:,.{decimals}f}"


def _percent_tick(v: float) -> str:
    return f"{v * 100:.0f}%"


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_e(label)}">'
        f"<title>{_e(label)}</title>"
    )


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    x_lim: tuple[float, float] | None = None,
    y_lim: tuple[float, float] | None = None,
    percent_axes: bool = False,
) -> str:
    """An SVG line chart with axes, grid and a legend on the right. Non-finite points are gaps."""
    width, height = 1000, 440
    left, right, top, bottom = 70, 340, 14, 54
    pw, ph = width - left - right, height - top - bottom

    def limits(vals: list[np.ndarray], given: tuple[float, float] | None) -> tuple:
        if given is not None:
            lo, hi = given
            step = _nice_step(hi - lo, 5)
            ticks = [lo + i * step for i in range(round((hi - lo) / step) + 1)]
            return lo, hi, ticks, step
        finite = np.concatenate([v[np.isfinite(v)] for v in vals]) if vals else np.array([])
        lo, hi, ticks = _axis(
            float(finite.min()) if finite.size else 0.0, float(finite.max()) if finite.size else 1
        )
        return lo, hi, ticks, ticks[1] - ticks[0] if len(ticks) > 1 else 1.0

    x0, x1, xticks, xstep = limits([s.x for s in series], x_lim)
    y0, y1, yticks, ystep = limits([s.y for s in series], y_lim)
    xfmt = _percent_tick if percent_axes else _tick_label(xstep)
    yfmt = _percent_tick if percent_axes else _tick_label(ystep)

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    out = [_svg_open(width, height, title)]
    clip = f"clip-{chart_id}"
    out.append(f'<defs><clipPath id="{clip}"><rect x="{left}" y="{top}" width="{pw}" ')
    out.append(f'height="{ph}"/></clipPath></defs>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-bg"/>')
    for t in xticks:
        out.append(
            f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" class="grid"/>'
            f'<text x="{sx(t):.1f}" y="{top + ph + 18}" text-anchor="middle" class="tick">'
            f"{_e(xfmt(t))}</text>"
        )
    for t in yticks:
        out.append(
            f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" class="grid"/>'
            f'<text x="{left - 8}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">'
            f"{_e(yfmt(t))}</text>"
        )
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle" class="axis-label">'
        f"{_e(x_label)}</text>"
        f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'class="axis-label">{_e(y_label)}</text>'
    )
    out.append(f'<g clip-path="url(#{clip})">')
    for s in series:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        ok = np.isfinite(s.x) & np.isfinite(s.y)
        # Split at non-finite points so a gap is drawn as a gap, not a straight jump.
        breaks = np.flatnonzero(~ok)
        for seg in np.split(np.arange(s.x.size), breaks):
            seg = seg[ok[seg]]
            if seg.size == 0:
                continue
            pts = " ".join(
                f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(s.x[seg], s.y[seg], strict=True)
            )
            out.append(
                f'<polyline points="{pts}" fill="none" stroke="{s.color}" '
                f'stroke-width="{s.width}"{dash} stroke-linejoin="round" data-series="{_e(s.name)}"/>'
            )
        if s.markers:
            for a, b in zip(s.x[ok], s.y[ok], strict=True):
                out.append(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="3.5" fill="{s.color}"/>')
    out.append("</g>")
    lx = left + pw + 16
    for i, s in enumerate(series):
        ly = top + 10 + i * 22
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{s.color}" '
            f'stroke-width="{max(s.width, 2)}"{dash}/>'
            f'<text x="{lx + 30}" y="{ly + 4}" class="legend">{_e(s.name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], x_label: str) -> str:
    """Horizontal SVG bars, one row per label, top to bottom in the order given."""
    row, top, bottom, right = 22, 10, 48, 90
    left = min(260, 16 + 7 * max((len(str(label)) for label in labels), default=8))
    width = 1000
    pw = width - left - right
    height = top + bottom + row * len(labels)
    vmax = max([v for v in values if math.isfinite(v)] + [0.0])
    _, hi, ticks = _axis(0.0, vmax if vmax > 0 else 1.0)
    fmt = _tick_label(ticks[1] - ticks[0])

    def sx(v: float) -> float:
        return left + max(v, 0.0) / hi * pw

    out = [_svg_open(width, height, title)]
    base = top + row * len(labels)
    for t in ticks:
        out.append(
            f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{base}" class="grid"/>'
            f'<text x="{sx(t):.1f}" y="{base + 16}" text-anchor="middle" class="tick">'
            f"{_e(fmt(t))}</text>"
        )
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        y = top + i * row
        w = sx(v) - left if math.isfinite(v) else 0.0
        out.append(
            f'<text x="{left - 8}" y="{y + row / 2 + 4}" text-anchor="end" class="tick">'
            f"{_e(label)}</text>"
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{PALETTE[0]}"/>'
            f'<text x="{left + w + 6:.1f}" y="{y + row / 2 + 4}" class="tick">'
            f"{_e(format_number(v, 1))}</text>"
        )
    out.append(
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" class="axis"/>'
        f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle" class="axis-label">'
        f"{_e(x_label)}</text></svg>"
    )
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Sections


def _section(section_id: str, title: str, body: str, caption: str = "") -> str:
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{cap}{body}</section>'


def _empty(message: str) -> str:
    return f'<p class="empty">{_e(message)}</p>'


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Sequence[bool] | None = None,
    cls: str = "",
) -> str:
    """`rows` hold cells that are already HTML (escaped text or markup). `numeric` right-aligns
    a column's header; by default every column but the first is numeric."""
    flags = numeric or [i > 0 for i in range(len(headers))]
    head = "".join(
        f'<th class="{"num" if flag else ""}">{_e(h)}</th>'
        for h, flag in zip(headers, flags, strict=True)
    )
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return (
        f'<div class="table-wrap"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _td(text: str, numeric: bool = True, attrs: str = "") -> str:
    cls = ' class="num"' if numeric else ""
    return f"<td{cls}{attrs}>{_e(text)}</td>"


def _model_order(metrics: dict, test_frame: pd.DataFrame) -> list[str]:
    names = list(metrics.get("models", {}))
    for col in test_frame.columns:
        for prefix in (PRED_VALUE_PREFIX, PRED_CHURN_PREFIX):
            if str(col).startswith(prefix) and str(col)[len(prefix) :] not in names:
                names.append(str(col)[len(prefix) :])
    return names


def _metric(model: dict, col: MetricColumn) -> object:
    holder = model.get(col.group, {}) if col.group else model
    return holder.get(col.key) if isinstance(holder, dict) else None


def _metrics_table(metrics: dict, primary: str | None) -> str:
    models = metrics.get("models", {})
    if not models:
        return _empty("No model metrics in this run.")
    headers = ["Model", *(c.label for c in METRIC_COLUMNS), "n"]
    rows = []
    for name, model in models.items():
        badge = ' <span class="badge">primary</span>' if name == primary else ""
        # A note (how the oracle is built, why a baseline failed) goes under the name rather
        # than in a column of its own, which would push the numbers off a laptop screen.
        note = model.get("error") or model.get("note")
        note_html = (
            f'<div class="note{" error" if model.get("error") else ""}">{_e(note)}</div>'
            if note
            else ""
        )
        cells = [f'<th scope="row" class="model">{_e(name)}{badge}{note_html}</th>']
        for col in METRIC_COLUMNS:
            attrs = f' data-model="{_e(name)}" data-metric="{_e(col.key)}"'
            cells.append(_td(format_number(_metric(model, col), col.digits), attrs=attrs))
        n = model.get("value", {}).get("n") if isinstance(model.get("value"), dict) else None
        cells.append(_td(_count(n)))
        rows.append(cells)
    return _table(headers, rows, cls="metrics")


def _pairs(
    test_frame: pd.DataFrame, target: str, column: str
) -> tuple[np.ndarray, np.ndarray, int]:
    y = pd.to_numeric(test_frame[target], errors="coerce").to_numpy(float)
    p = pd.to_numeric(test_frame[column], errors="coerce").to_numpy(float)
    ok = np.isfinite(y) & np.isfinite(p)
    return y[ok], p[ok], int((~ok).sum())


def _label(name: str, dropped: int, extra: str = "") -> str:
    label = f"{name}{extra}"
    return f"{label} ({dropped} non-finite dropped)" if dropped else label


def _styled(name: str, primary: str | None, colors: dict[str, str], **kw) -> dict:
    return {"color": colors[name], "width": 3.0 if name == primary else 2.0, **kw}


def _gain_chart(test_frame: pd.DataFrame, names: list[str], primary, colors) -> str:
    cols = [(n, PRED_VALUE_PREFIX + n) for n in names if PRED_VALUE_PREFIX + n in test_frame]
    if test_frame.empty or not cols:
        return _empty("No value predictions of test customers to draw.")
    y_all = pd.to_numeric(test_frame["future_value"], errors="coerce").to_numpy(float)
    y_all = y_all[np.isfinite(y_all)]
    if y_all.size == 0 or y_all.sum() == 0:
        return _empty("Total actual future value of test customers is zero: no gain curve.")
    series = []
    share, perfect = m.lorenz_curve(y_all, y_all)
    series.append(Series("perfect ordering", share, perfect, "#222222", dash="6 4", width=1.5))
    series.append(Series("random", np.array([0.0, 1.0]), np.array([0.0, 1.0]), "#999999", "2 4"))
    for name, col in cols:
        y, p, dropped = _pairs(test_frame, "future_value", col)
        if y.size == 0:
            continue
        x, v = m.lorenz_curve(y, p)
        gini = format_number(m.normalized_gini(y, p), 3)
        series.append(
            Series(_label(name, dropped, f" (Gini {gini})"), x, v, **_styled(name, primary, colors))
        )
    lo = min(0.0, *(float(np.nanmin(s.y)) for s in series))
    hi = max(1.0, *(float(np.nanmax(s.y)) for s in series))
    return line_chart(
        "gain",
        "Gain curve: share of actual future value captured",
        series,
        "share of test customers, highest predicted value first",
        "share of actual future value",
        x_lim=(0.0, 1.0),
        y_lim=(0.0, 1.0) if (lo, hi) == (0.0, 1.0) else _axis(lo, hi)[:2],
        percent_axes=True,
    )


def _calibration_chart(test_frame: pd.DataFrame, names: list[str], primary, colors) -> str:
    # Primary model and the baselines; the other GBM variants are compared in the ablation.
    shown = [n for n in names if n == primary or not n.startswith("gbm_")]
    cols = [(n, PRED_VALUE_PREFIX + n) for n in shown if PRED_VALUE_PREFIX + n in test_frame]
    if test_frame.empty or not cols:
        return _empty("No value predictions of test customers to draw.")
    series = []
    for name, col in cols:
        y, p, dropped = _pairs(test_frame, "future_value", col)
        if y.size == 0:
            continue
        rows = m.calibration_by_decile(y, p)
        x = np.array([r["mean_pred"] for r in rows], float)
        v = np.array([r["mean_actual"] for r in rows], float)
        series.append(
            Series(_label(name, dropped), x, v, markers=True, **_styled(name, primary, colors))
        )
    if not series:
        return _empty("No finite value predictions of test customers to draw.")
    lo = min(0.0, *(float(min(s.x.min(), s.y.min())) for s in series))
    hi = max(float(max(s.x.max(), s.y.max())) for s in series)
    lo, hi, _ = _axis(lo, hi)
    diag = Series("perfect calibration", np.array([lo, hi]), np.array([lo, hi]), "#999999", "2 4")
    return line_chart(
        "calibration",
        "Calibration by decile of predicted value",
        [diag, *series],
        "mean predicted future value in the decile",
        "mean actual future value",
        x_lim=(lo, hi),
        y_lim=(lo, hi),
    )


def _churn_series(test_frame: pd.DataFrame, names: list[str]) -> list[tuple[str, str]]:
    return [(n, PRED_CHURN_PREFIX + n) for n in names if PRED_CHURN_PREFIX + n in test_frame]


def _roc_chart(test_frame: pd.DataFrame, names: list[str], primary, colors) -> str:
    cols = _churn_series(test_frame, names)
    if test_frame.empty or not cols:
        return _empty("No churn predictions of test customers to draw.")
    series = [Series("random", np.array([0.0, 1.0]), np.array([0.0, 1.0]), "#999999", "2 4")]
    for name, col in cols:
        y, p, dropped = _pairs(test_frame, "churned", col)
        if y.size == 0 or y.min() == y.max():
            return _empty("Test customers hold a single churn class: ROC curves are undefined.")
        fpr, tpr = _thin(*roc_points(y, p), MAX_ROC_POINTS)
        auc = format_number(m.roc_auc(y, p), 3)
        series.append(
            Series(
                _label(name, dropped, f" (AUC {auc})"), fpr, tpr, **_styled(name, primary, colors)
            )
        )
    return line_chart(
        "roc",
        "Churn ROC curves",
        series,
        "false positive rate",
        "true positive rate",
        x_lim=(0.0, 1.0),
        y_lim=(0.0, 1.0),
        percent_axes=True,
    )


def _reliability_chart(test_frame: pd.DataFrame, names: list[str], primary, colors) -> str:
    cols = _churn_series(test_frame, names)
    if test_frame.empty or not cols:
        return _empty("No churn predictions of test customers to draw.")
    series = [
        Series("perfect calibration", np.array([0.0, 1.0]), np.array([0.0, 1.0]), "#999999", "2 4")
    ]
    for name, col in cols:
        y, p, dropped = _pairs(test_frame, "churned", col)
        if y.size == 0:
            continue
        rows = m.reliability_curve(y, np.clip(p, 0.0, 1.0), bins=10)
        x = np.array([r["mean_prob"] for r in rows], float)
        v = np.array([r["frac_positive"] for r in rows], float)
        series.append(
            Series(_label(name, dropped), x, v, markers=True, **_styled(name, primary, colors))
        )
    return line_chart(
        "reliability",
        "Churn reliability",
        series,
        "mean predicted churn probability (10 equal-width bins)",
        "observed churn rate",
        x_lim=(0.0, 1.0),
        y_lim=(0.0, 1.0),
        percent_axes=True,
    )


def _importance_chart(metrics: dict, primary: str | None) -> str:
    model = metrics.get("models", {}).get(primary or "", {})
    imp = model.get("feature_importance") if isinstance(model, dict) else None
    if not imp:
        return _empty(f"No feature importance recorded for the primary model {primary!r}.")
    items = sorted(
        ((str(k), float(v)) for k, v in imp.items() if v is not None),
        key=lambda kv: (-kv[1] if math.isfinite(kv[1]) else math.inf, kv[0]),
    )[:TOP_FEATURES]
    return bar_chart(
        f"Feature importance of {primary}",
        [k for k, _ in items],
        [v for _, v in items],
        "total gain of the value model's splits on the feature",
    )


def _ablation_table(metrics: dict) -> str:
    ablation = metrics.get("ablation") or {}
    if not ablation:
        return _empty("No text ablation in this run (text features disabled or no reviews).")
    order = [n for n in TEXT_ABLATION if n in ablation] + sorted(
        n for n in ablation if n not in TEXT_ABLATION
    )
    base = (ablation.get(TEXT_ABLATION[0]) or {}).get("normalized_gini")
    rows = []
    for name in order:
        a = ablation[name] or {}
        gini = a.get("normalized_gini")
        delta = (
            gini - base if isinstance(gini, int | float) and isinstance(base, int | float) else None
        )
        delta_text = format_number(delta, 3)
        if name == TEXT_ABLATION[0]:
            delta_text = "reference"
        elif delta_text != MISSING and delta is not None and delta > 0:
            delta_text = f"+{delta_text}"
        rows.append(
            [
                f'<th scope="row" class="model">{_e(name)}</th>',
                _td(format_number(gini, 3)),
                _td(delta_text),
                _td(format_number(a.get("spearman"), 3)),
                _td(format_number(a.get("churn_roc_auc"), 3)),
            ]
        )
    return _table(
        ["Variant", "Normalized Gini", "Δ Gini vs behavioural", "Spearman", "Churn ROC-AUC"], rows
    )


OVER_REPRESENTED = 1.2
"""A topic is flagged over-represented in a group when its lift there is at least this."""


def _lift(value: object) -> str:
    text = format_number(value, 2)
    if isinstance(value, int | float) and math.isfinite(value) and value >= OVER_REPRESENTED:
        return f"<strong>{_e(text)}×</strong>"
    return _e(text if text == MISSING else f"{text}×")


def _topics_table(metrics: dict) -> str:
    topics = (metrics.get("topics") or {}).get("topics") or []
    if not topics:
        return _empty("No topics in this run (text or text.topics disabled, or no reviews).")
    rows = []
    for t in sorted(topics, key=lambda t: -(t.get("reviews") or 0)):
        rows.append(
            [
                _td(str(t.get("topic")), numeric=False),
                _td(", ".join(t.get("words") or []) or MISSING, numeric=False),
                _td(_count(t.get("reviews"))),
                _td(_percent(t.get("share"))),
                f'<td class="num">{_lift(t.get("churner_lift"))}</td>',
                f'<td class="num">{_lift(t.get("top_value_lift"))}</td>',
            ]
        )
    headers = [
        "Topic",
        "Most distinctive words",
        "Reviews",
        "Share",
        "Lift among predicted churners",
        "Lift in top value segment",
    ]
    return _table(headers, rows)


def _topics_caption(metrics: dict) -> str:
    t = metrics.get("topics") or {}
    return (
        "Reviews clustered by their embeddings (k-means on a sample, every review assigned to "
        "its nearest centroid, encoder variant "
        f"{t.get('variant', MISSING)}); each topic is named by its most distinctive words "
        "(class-based TF-IDF). Lift is the topic's share of a group's reviews over its share of "
        f"all reviews; predicted churners have churn probability ≥ {t.get('churn_threshold', 0.5)}. "
        f"Lifts of {OVER_REPRESENTED}× or more are in bold."
    )


def _segments_table(segments: pd.DataFrame) -> str:
    if segments.empty:
        return _empty("No value segments.")
    rows = []
    numbers = ["customers", "share_of_predicted_value", "churn_rate"]
    ordered = segments.assign(
        **{c: pd.to_numeric(segments[c], errors="coerce") for c in numbers}
    ).sort_values("value_segment", ascending=False)
    for seg in ordered.itertuples(index=False):
        share = float(seg.share_of_predicted_value)
        width = max(0.0, min(share, 1.0)) * 100 if math.isfinite(share) else 0.0
        rows.append(
            [
                _td(str(seg.value_segment), numeric=False),
                _td(_count(seg.customers)),
                f'<td class="num">{_e(_percent(share))}</td>'
                f'<td class="bar-cell"><span class="bar" style="width:{width:.1f}%"></span></td>',
                _td(_percent(seg.churn_rate)),
            ]
        )
    total = pd.to_numeric(segments["customers"], errors="coerce").sum()
    rows.append(
        [
            '<th scope="row">all</th>',
            _td(_count(total)),
            _td(_percent(pd.to_numeric(segments["share_of_predicted_value"]).sum())),
            "<td></td>",
            "<td></td>",
        ]
    )
    headers = ["Value segment", "Customers", "Share of predicted value", "", "Churn rate"]
    return _table(headers, rows, cls="segments")


def _explanations_table(scores: pd.DataFrame, n: int) -> str:
    sample = sample_explanations(scores, n)
    if sample.empty:
        return _empty("No scored customers.")
    k = 1
    while f"top_feature_{k}" in sample.columns:
        k += 1
    has_interval = {"value_p10", "value_p90"} <= set(sample.columns)
    headers = ["Customer", "Segment", "Predicted value"]
    headers += ["Interval p10–p90"] if has_interval else []
    headers += ["Churn probability"] + (["Top contributing features"] if k > 1 else [])
    rows = []
    for r in sample.to_dict("records"):
        cells = [
            _td(str(r["customer_id"]), numeric=False),
            _td(str(r["value_segment"])),
            _td(format_number(r["future_value_pred"], 2)),
        ]
        if has_interval:
            lo, hi = format_number(r["value_p10"], 2), format_number(r["value_p90"], 2)
            cells.append(_td(f"{lo} – {hi}"))
        cells.append(_td(_percent(r["churn_prob"])))
        features = []
        for j in range(1, k):
            contrib = r.get(f"top_contrib_{j}")
            text = format_number(contrib, 3)
            positive = text != MISSING and float(text) > 0
            features.append(
                f'<span class="feature">{_e(r[f"top_feature_{j}"])} '
                f'<span class="{"pos" if positive else "neg"}">'
                f"{_e(f'+{text}' if positive else text)}</span></span>"
            )
        if features:
            cells.append(f'<td class="features">{" ".join(features)}</td>')
        rows.append(cells)
    numeric = [False, *([True] * (len(headers) - 1))]
    if k > 1:
        numeric[-1] = False
    return _table(headers, rows, numeric, cls="explanations")


def _counts_tables(metrics: dict) -> str:
    counts = metrics.get("counts") or {}
    if not counts:
        return _empty("No ingest counts recorded.")
    rows, reasons = [], []
    for table, c in counts.items():
        rows_in, rejected = c.get("rows_in"), c.get("rows_rejected")
        rate = rejected / rows_in if isinstance(rejected, int) and rows_in else None
        rows.append(
            [
                f'<th scope="row">{_e(table)}</th>',
                _td(_count(rows_in)),
                _td(_count(c.get("rows_accepted"))),
                _td(_count(rejected)),
                _td(_percent(rate, 2)),
            ]
        )
        for reason, n in sorted((c.get("rejects_by_reason") or {}).items()):
            reasons.append(
                [_td(str(table), numeric=False), _td(str(reason), False), _td(_count(n))]
            )
    out = _table(["Table", "Rows in", "Accepted", "Rejected", "Rejected share"], rows)
    out += "<h3>Rejects by reason</h3>"
    out += (
        _table(["Table", "Reason", "Rows"], reasons, [False, False, True])
        if reasons
        else _empty("No rows rejected.")
    )
    return out


def _timings_table(metrics: dict) -> str:
    timings = metrics.get("timings_s") or {}
    skipped = metrics.get("skipped_stages") or []
    out = ""
    if timings:
        rows = [[_td(str(k), numeric=False), _td(format_number(v, 1))] for k, v in timings.items()]
        total = sum(v for v in timings.values() if isinstance(v, int | float))
        rows.append(['<th scope="row">total</th>', _td(format_number(total, 1))])
        out += _table(["Stage", "Seconds"], rows)
    else:
        out += _empty("No stage ran in this invocation.")
    if skipped:
        out += (
            f'<p class="caption">Skipped (already done with this config): '
            f"{_e(', '.join(map(str, skipped)))}</p>"
        )
    return out


def _summary(metrics: dict, run_dir: str | None) -> str:
    pop = metrics.get("population") or {}
    items = [
        ("Run directory", run_dir or metrics.get("run_dir") or MISSING),
        ("Source", metrics.get("source") or MISSING),
        ("Cutoff", metrics.get("cutoff") or MISSING),
        ("Horizon", f"{metrics['horizon_days']} days" if "horizon_days" in metrics else MISSING),
        ("Primary model", metrics.get("primary_model") or MISSING),
        ("Customers", _count(pop.get("customers"))),
        (
            "Split train / valid / test",
            " / ".join(_count(pop.get(k)) for k in ("train", "valid", "test")),
        ),
        ("Evaluated test customers", _count(pop.get("evaluated_test_customers"))),
        ("Test churn rate", _percent(pop.get("test_churn_rate"))),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return f'<header id="summary"><h1>Customer lifetime value and churn</h1><dl>{dl}</dl></header>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:#1d2330;background:#f4f5f7;margin:0}
main{max-width:1120px;margin:0 auto;padding:20px 28px 60px}
header{background:#fff;border-radius:8px;padding:16px 24px;margin:20px 0 12px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
h1{font-size:24px;margin:0 0 10px}h2{font-size:18px;margin:0 0 6px}h3{font-size:15px;margin:16px 0 6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0}
dt{color:#5b6473}dd{margin:0;font-variant-numeric:tabular-nums;word-break:break-all}
nav{font-size:13px;margin:0 0 12px}nav a{margin-right:12px;color:#0b5cad;text-decoration:none}
section{background:#fff;border-radius:8px;padding:16px 24px;margin:12px 0;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.caption{color:#5b6473;margin:0 0 10px;max-width:900px}
.empty{color:#8a4b00;background:#fff6e5;padding:8px 12px;border-radius:4px}
.table-wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
thead th{background:#eef1f5;font-weight:600;font-size:13px;vertical-align:bottom}
table.metrics th,table.metrics td{padding:5px 7px}
table.metrics thead th{max-width:88px;white-space:normal}
.num{text-align:right;white-space:nowrap}
th.model{font-weight:600}th.model .note{font-weight:400;font-size:12px;color:#5b6473;
max-width:220px}th.model .error{color:#b00020}
.badge{font-size:11px;background:#0072B2;color:#fff;border-radius:3px;padding:1px 5px;
margin-left:4px;font-weight:500}
table.metrics{font-size:13px}
.bar-cell{width:220px}.bar{display:inline-block;height:10px;background:#0072B2;border-radius:2px}
td.features{font-size:13px}.feature{white-space:nowrap;margin-right:14px}
.pos{color:#0a7a3a}.neg{color:#b00020}
svg{max-width:100%;height:auto;display:block}
svg .plot-bg{fill:#fbfcfd}svg .frame{fill:none;stroke:#b8bec8}
svg .grid{stroke:#e3e6eb}svg .axis{stroke:#b8bec8}
svg text{font-family:inherit}svg .tick{font-size:12px;fill:#3b4350}
svg .legend{font-size:12.5px;fill:#1d2330}svg .axis-label{font-size:13px;fill:#3b4350}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_report(
    metrics: dict,
    scores: pd.DataFrame,
    test_frame: pd.DataFrame,
    segments: pd.DataFrame,
    run_dir: str | None = None,
    explanation_rows: int = 20,
) -> str:
    """The report page as one HTML string (see `write_report` for the inputs)."""
    _require(test_frame, TEST_FRAME_COLUMNS, "test_frame")
    _require(scores, SCORES_COLUMNS, "scores")
    _require(segments, SEGMENTS_COLUMNS, "segments")
    primary = metrics.get("primary_model")
    names = _model_order(metrics, test_frame)
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    n_test = len(test_frame)

    sections = [
        _section(
            "metrics-table",
            "Model metrics on the test customers",
            _metrics_table(metrics, primary),
            "Value metrics compare predicted with actual future value over the horizon; churn "
            "metrics use the churn probability. Gini, Spearman and top-decile share depend only "
            f"on the ranking. {_e(MISSING)} means the model does not predict it or it is "
            "undefined on this split.",
        ),
        _section(
            "gain-chart",
            "Gain curve",
            _gain_chart(test_frame, names, primary, colors),
            f"Test customers ({n_test:,}) ordered by predicted value, highest first; the curve "
            "shows the share of their actual future value held by the top x%. Higher is better; "
            "the dashed black line is the best any model could do.",
        ),
        _section(
            "calibration-chart",
            "Value calibration",
            _calibration_chart(test_frame, names, primary, colors),
            "Test customers cut into ten equal groups by predicted value; each point is one "
            "decile's mean prediction against its mean actual value. On the diagonal is "
            "calibrated. Primary model and baselines.",
        ),
        _section(
            "roc-chart",
            "Churn ROC",
            _roc_chart(test_frame, names, primary, colors),
            "True against false positive rate over every churn-probability threshold.",
        ),
        _section(
            "reliability-chart",
            "Churn reliability",
            _reliability_chart(test_frame, names, primary, colors),
            "Observed churn rate against the mean predicted probability per bin; on the "
            "diagonal is calibrated.",
        ),
        _section(
            "importance-chart",
            "Feature importance",
            _importance_chart(metrics, primary),
            f"Top {TOP_FEATURES} features of the primary model's value booster, by total gain.",
        ),
        _section(
            "ablation",
            "Text ablation",
            _ablation_table(metrics),
            "The same gradient-boosted model on behavioural features alone, plus pretrained "
            "text embeddings, plus fine-tuned text embeddings.",
        ),
        _section(
            "topics", "What customers write about", _topics_table(metrics), _topics_caption(metrics)
        ),
        _section(
            "segments",
            "Value segments",
            _segments_table(segments),
            "Segments are deciles of predicted value (edges fitted on train customers); 10 "
            "holds the highest predictions.",
        ),
        _section(
            "explanations",
            "Example customers",
            _explanations_table(scores, explanation_rows),
            "A sample spread evenly from the highest to the lowest predicted value, with the "
            "features that moved each value prediction most (signed contributions on the "
            "model's link scale: positive raises the prediction).",
        ),
        _section("counts", "Ingest counts", _counts_tables(metrics)),
        _section("timings", "Stage timings", _timings_table(metrics)),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(sid.replace("-", " "))}</a>' for sid in SECTION_IDS[1:])
    title = f"clvray report – {run_dir or metrics.get('run_dir') or ''}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"{_summary(metrics, run_dir)}<nav>{nav}</nav>{''.join(sections)}"
        "</main></body></html>\n"
    )


def write_report(
    metrics: dict,
    scores: pd.DataFrame,
    test_frame: pd.DataFrame,
    segments: pd.DataFrame,
    run_dir: str,
    storage: Storage,
    explanation_rows: int = 20,
) -> str:
    """Write `<run_dir>/report/index.html` and return its URI.

    Inputs, all plain data held on the driver:

    - `metrics`: the dict written to `metrics.json` (`models`, `counts`, `ablation`,
      `population`, `cutoff`, `horizon_days`, `timings_s`, `primary_model`, ...). Missing keys
      and null metrics are shown as "–".
    - `test_frame`: one row per evaluated test customer with `customer_id`, `future_value`
      (actual spend over the horizon), `churned` (actual 0/1), and per model `<name>` one
      `pred_value__<name>` column (predicted future value) and, for models that predict churn,
      one `pred_churn__<name>` column (probability). Models are matched to `metrics["models"]`
      by name; rows with a non-finite prediction are left out of that model's curves.
    - `scores`: a sample (a few thousand rows) of the scores table: `customer_id`,
      `future_value_pred`, `churn_prob`, `value_segment`, optionally `value_p10` / `value_p90`
      and `top_feature_k` / `top_contrib_k` for k = 1, 2, ...
    - `segments`: one row per value segment with `value_segment`, `customers`,
      `share_of_predicted_value` (0..1) and `churn_rate` (0..1), aggregated over all customers.

    Raises `ValueError` naming the frame and column when a required column is missing.

    Cost: a few sorts of `test_frame` per model (O(n log n) on the driver; at the evaluation
    cap of 2M customers, seconds). The page size does not grow with n: curves are drawn with
    at most a few hundred points each (a run with five models: about 60-100 KB).
    """
    uri = join(run_dir, "report", "index.html")
    storage.write_text(
        uri,
        render_report(metrics, scores, test_frame, segments, run_dir, explanation_rows),
    )
    return uri
