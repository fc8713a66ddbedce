"""Evaluation reports: CSV tables, a JSON summary, a Dice box plot and a self-contained HTML page.

:func:`write_report` turns the per-(method, pair) records of :mod:`learnreg.runner.evaluate` into

- ``results.csv``: one row per record, the scalar fields (per-structure dicts left out);
- ``per_structure.csv``: ``method, pair, label, dice, hd95`` (and ``name`` when label names
  are given), one row per structure;
- ``summary.json``: per-method means with bootstrap CIs, paired comparisons against the
  reference method, and the failures;
- ``dice_boxplot.png``: per-structure Dice, methods side by side (when records carry Dice);
- ``report.html``: one file with every table and figure embedded (inline CSS, PNGs as base64
  data URIs, nothing fetched from anywhere), readable offline and attachable to a review;
- ``report.md``: the same tables in Markdown, figures linked.

All files are first written into a staging folder inside ``outdir``; only when every one of
them is complete are they moved into place, each with ``os.replace``. An exception on the way
leaves ``outdir`` as it was.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from learnreg import __version__
from learnreg.eval.figures import save_figure
from learnreg.eval.statistics import DEFAULT_METRICS, compare, methods_in, summarize

__all__ = ["RECORD_COLUMNS", "METRIC_INFO", "write_report", "dice_boxplot_figure"]

#: Scalar columns of ``results.csv``, in this order (further scalar keys follow, sorted).
RECORD_COLUMNS: tuple[str, ...] = (
    "method",
    "pair",
    "fixed",
    "moving",
    "dice_mean",
    "hd95_mean",
    "tre_mean",
    "tre_max",
    "folding_fraction",
    "folding_count",
    "sdlogj",
    "ice_mean",
    "seconds",
    "peak_memory_mb",
    "error",
    "qc_png",
)
_PER_STRUCTURE_COLUMNS = ("method", "pair", "label", "dice", "hd95")
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@dataclass(frozen=True)
class MetricInfo:
    label: str
    unit: str = ""
    higher_is_better: bool = False
    fmt: str = ".3g"
    scale: float = 1.0  # displayed value = scale * stored value

    def header(self) -> str:
        arrow = "↑" if self.higher_is_better else "↓"
        return f"{self.label}{f' ({self.unit})' if self.unit else ''} {arrow}"

    def format(self, value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "—"
        return format(self.scale * float(value), self.fmt)


METRIC_INFO: dict[str, MetricInfo] = {
    "dice_mean": MetricInfo("Dice", "", True, ".3f"),
    "hd95_mean": MetricInfo("HD95", "mm", False, ".2f"),
    "tre_mean": MetricInfo("TRE", "mm", False, ".2f"),
    "tre_max": MetricInfo("max TRE", "mm", False, ".2f"),
    "folding_fraction": MetricInfo("folded voxels", "%", False, ".3g", 100.0),
    "folding_count": MetricInfo("folded voxels", "count", False, ".0f"),
    "sdlogj": MetricInfo("SD log|J|", "", False, ".3f"),
    "ice_mean": MetricInfo("inverse consistency", "mm", False, ".3f"),
    "seconds": MetricInfo("runtime", "s", False, ".3g"),
    "peak_memory_mb": MetricInfo("peak memory", "MB", False, ".0f"),
}


def _info(metric: str) -> MetricInfo:
    return METRIC_INFO.get(metric, MetricInfo(metric))


# ----------------------------------------------------------------------------- helpers
def _label_key(label: str):
    s = str(label)
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating))


def _finite(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else ""
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def _jsonable(obj):
    """Plain JSON values: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def _ok(r: Mapping) -> bool:
    return not r.get("error")


def _labels(records: Sequence[Mapping], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in (r.get(key) or {}).keys():
            seen[str(k)] = None
    return sorted(seen, key=_label_key)


def _pairs_in(records: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(str(r["pair"]) for r in records))


# ----------------------------------------------------------------------------- tables
def _results_rows(records: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    extra = sorted(
        {
            str(k)
            for r in records
            for k, v in r.items()
            if k not in RECORD_COLUMNS and k not in ("dice", "hd95") and _is_scalar(v)
        }
    )
    columns = list(RECORD_COLUMNS) + extra
    rows = [[_csv_cell(r.get(c)) for c in columns] for r in records]
    return columns, rows


def _per_structure_rows(
    records: Sequence[Mapping], names: Mapping[str, str] | None = None
) -> list[list[str]]:
    """Rows of per_structure.csv; with ``names``, a last column holds each structure's name."""
    rows = []
    for r in records:
        dice = {str(k): v for k, v in (r.get("dice") or {}).items()}
        hd = {str(k): v for k, v in (r.get("hd95") or {}).items()}
        for label in sorted(set(dice) | set(hd), key=_label_key):
            rows.append(
                [
                    _csv_cell(r["method"]),
                    _csv_cell(r["pair"]),
                    label,
                    _csv_cell(_finite(dice.get(label))),
                    _csv_cell(_finite(hd.get(label))),
                    *([_csv_cell(names.get(label, ""))] if names is not None else []),
                ]
            )
    return rows


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- figure
def dice_boxplot_figure(
    records: Sequence[Mapping],
    label_names: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Figure | None:
    """Per-structure Dice box plots, horizontal, methods side by side within each structure.

    The first row is the per-pair mean over structures (``dice_mean``). With more than 30 rows
    the structures are split over two columns. Returns ``None`` when no record has Dice.
    """
    ok = [r for r in records if _ok(r)]
    labels = _labels(ok, "dice")
    methods = methods_in(records)
    if not labels or not methods:
        return None
    names = {str(k): str(v) for k, v in (label_names or {}).items()}

    def values(method: str, label: str | None) -> np.ndarray:
        out = []
        for r in ok:
            if str(r["method"]) != method:
                continue
            if label is None:
                v = _finite(r.get("dice_mean"))
                if v is None and r.get("dice"):
                    d = [_finite(x) for x in r["dice"].values()]
                    d = [x for x in d if x is not None]
                    v = float(np.mean(d)) if d else None
            else:
                v = _finite({str(k): x for k, x in (r.get("dice") or {}).items()}.get(label))
            if v is not None:
                out.append(v)
        return np.asarray(out)

    rows: list[str | None] = [None, *labels]
    ticks = ["mean of all structures"] + [
        f"{names[k]} ({k})" if k in names else f"structure {k}" for k in labels
    ]
    ncols = 1 if len(rows) <= 30 else 2
    per_col = -(-len(rows) // ncols)
    m = len(methods)
    colors = [_PALETTE[i % len(_PALETTE)] for i in range(m)]
    band = 0.8
    row_h = max(0.26, 0.12 * m + 0.1)
    longest = max(len(t) for t in ticks)
    fig = Figure(
        figsize=(ncols * (5.0 + 0.065 * longest) + 0.4, per_col * row_h + 1.8),
        layout="constrained",
    )
    axes = np.atleast_1d(fig.subplots(1, ncols, squeeze=False)[0])
    n_pairs = len(_pairs_in(ok))
    for c, ax in enumerate(axes):
        chunk = rows[c * per_col : (c + 1) * per_col]
        for i in range(1, len(chunk), 2):
            ax.axhspan(i - 0.5, i + 0.5, color="0.93", zorder=0, lw=0)
        for k, method in enumerate(methods):
            data, pos = [], []
            for i, row in enumerate(chunk):
                v = values(method, row)
                if v.size:
                    data.append(v)
                    pos.append(i - band / 2 + (k + 0.5) * band / m)
            if not data:
                continue
            ax.boxplot(
                data,
                positions=pos,
                widths=0.85 * band / m,
                orientation="horizontal",
                patch_artist=True,
                manage_ticks=False,
                showmeans=True,
                boxprops={"facecolor": colors[k], "edgecolor": "0.15", "linewidth": 0.7},
                medianprops={"color": "black", "linewidth": 1.2},
                whiskerprops={"color": "0.15", "linewidth": 0.7},
                capprops={"color": "0.15", "linewidth": 0.7},
                meanprops={
                    "marker": "D",
                    "markerfacecolor": "white",
                    "markeredgecolor": "black",
                    "markersize": 3.5,
                },
                flierprops={
                    "marker": "o",
                    "markersize": 2.5,
                    "markerfacecolor": colors[k],
                    "markeredgecolor": "none",
                },
                zorder=2,
            )
        ax.set_yticks(range(len(chunk)), ticks[c * per_col : c * per_col + len(chunk)])
        ax.set_ylim(len(chunk) - 0.5, -0.5)
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks(np.linspace(0, 1, 11))
        ax.xaxis.grid(True, color="0.75", lw=0.5, zorder=1)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", labelsize=8, length=0)
        ax.tick_params(axis="x", labelsize=8, top=True, labeltop=True)
        ax.set_xlabel("Dice overlap (1 = perfect)", fontsize=9)
        if c == 0:
            ax.axhline(0.5, color="0.3", lw=0.8)
            ax.get_yticklabels()[0].set_fontweight("bold")
    heading = (
        f"{title + ': ' if title else ''}per-structure Dice, {n_pairs} pair{'s' * (n_pairs != 1)}, "
        f"{len(labels)} structures"
    )
    legend = fig.legend(
        handles=[
            Patch(facecolor=col, edgecolor="0.15", label=mt)
            for col, mt in zip(colors, methods, strict=True)
        ],
        loc="outside upper center",
        ncols=min(m, 6),
        fontsize=9,
        frameon=False,
        title=f"{heading}\nbox: quartiles, line: median, ◇: mean, whiskers: 1.5 IQR, dots: outliers",
        title_fontsize=10,
    )
    legend.get_title().set_multialignment("center")
    return fig


# ----------------------------------------------------------------------------- report text
_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.meta{color:#555;font-size:.92em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:right;vertical-align:top}
th{background:#f0f2f5}
td.t,th.t{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.ci{color:#666;font-size:.85em;white-space:nowrap}
.n{color:#888;font-size:.8em}
.best{font-weight:bold}
tr.better td{background:#e3f4e1}
tr.worse td{background:#fbe3e1}
tr.failed td{background:#fdecea}
tr.group td{border-top:2px solid #888}
td.m{white-space:nowrap;text-align:left}
.err{color:#a61b1b;font-family:monospace;white-space:pre-wrap;text-align:left}
img{max-width:100%;height:auto;border:1px solid #ddd}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
.note{color:#555;font-size:.9em;max-width:60em}
.wide{overflow-x:auto}
"""


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml",
        ".gif": "image/gif",
    }.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


@dataclass
class _Context:
    title: str
    created: str
    records: list[dict]
    methods: list[str]
    pairs: list[str]
    metrics: list[str]  # metrics with at least one value
    summary: dict
    comparison: dict
    failures: list[dict]
    confidence: float
    n_resamples: int
    boxplot: Path | None
    outdir: Path


def _verdict(res: Mapping, metric: str, alpha: float = 0.05) -> str:
    if res["n"] < 2 or res["low"] is None or not math.isfinite(res["low"]):
        return "too few pairs"
    p = res.get("p_holm", res["p_value"])
    if res["low"] > 0 or res["high"] < 0:
        if p is not None and math.isfinite(p) and p < alpha:
            up = res["low"] > 0
            return "better" if up == _info(metric).higher_is_better else "worse"
    return "no significant difference"


def _summary_cells(ctx: _Context, method: str, metric: str, best: bool) -> tuple[str, str]:
    s = ctx.summary[method][metric]
    info = _info(metric)
    if s["n"] == 0:
        return "—", "—"
    mean = info.format(s["mean"])
    ci = f"[{info.format(s['low'])}, {info.format(s['high'])}]" if s["n"] > 1 else ""
    cls = ' class="best"' if best else ""
    # n is shown only where it differs from the number of pairs the method finished
    n_note = "" if s["n"] == _counts(ctx, method)[0] else f"<br><span class='n'>n={s['n']}</span>"
    html_cell = f"<span{cls}>{_e(mean)}</span><br><span class='ci'>{_e(ci)}</span>{n_note}"
    return html_cell, f"{mean} {ci} (n={s['n']})".replace("  ", " ")


def _best_methods(ctx: _Context, metric: str) -> set[str]:
    means = {
        m: ctx.summary[m][metric]["mean"]
        for m in ctx.methods
        if ctx.summary[m][metric]["n"] > 0 and math.isfinite(ctx.summary[m][metric]["mean"])
    }
    if len(means) < 2:
        return set()
    pick = max if _info(metric).higher_is_better else min
    target = pick(means.values())
    return {m for m, v in means.items() if v == target}


def _counts(ctx: _Context, method: str) -> tuple[int, int]:
    rs = [r for r in ctx.records if str(r["method"]) == method]
    failed = sum(1 for r in rs if not _ok(r))
    return len(rs) - failed, failed


def _comparison_rows(ctx: _Context):
    comps = ctx.comparison.get("comparisons", {})
    for method, per_metric in comps.items():
        for metric in ctx.metrics:
            res = per_metric.get(metric)
            if res is None or res["n"] == 0:
                continue
            yield method, metric, res


def _fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


SMALL_SAMPLE = 5
"""Below this many pairs the report says its intervals and tests mean little."""


def _small_sample_note(n: int) -> str:
    return (
        f"Only {n} pair{'s' * (n != 1)}: the bootstrap intervals are too narrow to trust and "
        "the two-sided Wilcoxon signed-rank test cannot reach p < 0.05 with fewer than 6 "
        "pairs; treat the differences as anecdotes."
    )


def _render_html(ctx: _Context) -> str:
    ref = ctx.comparison.get("reference")
    pct = f"{100 * ctx.confidence:g}%"
    n_failed = len(ctx.failures)
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(ctx.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(ctx.title)}</h1>",
        f"<p class='meta'>Generated {_e(ctx.created)} · learnreg {_e(__version__)} · "
        f"{len(ctx.methods)} method(s) · {len(ctx.pairs)} pair(s) · "
        f"{len(ctx.records)} registration(s), {n_failed} failed · reference: "
        f"<b>{_e(ref) if ref else '—'}</b></p>",
        "<nav><a href='#summary'>Summary</a><a href='#comparisons'>Comparisons</a>"
        "<a href='#dice'>Dice per structure</a>"
        + ("<a href='#failures'>Failures</a>" if n_failed else "")
        + "<a href='#pairs'>Per pair</a><a href='#qc'>QC figures</a></nav>",
    ]

    # summary
    out += [
        "<h2 id='summary'>Summary per method</h2>",
        f"<p class='note'>Mean over the pairs that finished, with its {pct} percentile bootstrap "
        f"confidence interval ({ctx.n_resamples} resamples of pairs); n = pairs with a value. "
        "Failed pairs are left out of every mean (see the counts); n is shown where a metric "
        "has fewer values than the method has finished pairs. ↑ higher is better, "
        "↓ lower is better; bold marks the best mean.</p>",
    ]
    if 0 < len(ctx.pairs) < SMALL_SAMPLE:
        out.append(f"<p class='note'><b>{_e(_small_sample_note(len(ctx.pairs)))}</b></p>")
    out += [
        "<div class='wide'><table><thead><tr><th class='t'>method</th><th>pairs ok / failed</th>",
    ]
    out += [f"<th>{_e(_info(mt).header())}</th>" for mt in ctx.metrics]
    out.append("</tr></thead><tbody>")
    best = {mt: _best_methods(ctx, mt) for mt in ctx.metrics}
    for method in ctx.methods:
        ok, failed = _counts(ctx, method)
        cells = [_summary_cells(ctx, method, mt, method in best[mt])[0] for mt in ctx.metrics]
        out.append(
            f"<tr><td class='t'>{_e(method)}</td><td>{ok} / {failed}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    out.append("</tbody></table></div>")

    # comparisons
    out.append(f"<h2 id='comparisons'>Paired comparisons against {_e(ref or '—')}</h2>")
    rows = list(_comparison_rows(ctx))
    if not rows:
        out.append("<p class='note'>Only one method: nothing to compare.</p>")
    else:
        out += [
            f"<p class='note'>Δ = method − {_e(ref)}, mean over the pairs both finished, with its "
            f"{pct} bootstrap CI. p: two-sided Wilcoxon signed-rank test on the same pairs; "
            "p (Holm): adjusted over the methods compared on that metric. A method is called "
            "better or worse only when the CI excludes 0 and the Holm-adjusted p &lt; 0.05.</p>",
            "<div class='wide'><table><thead><tr><th class='t'>method</th><th class='t'>metric"
            f"</th><th>n</th><th>method mean</th><th>{_e(ref)} mean</th><th>Δ [{pct} CI]</th>"
            "<th>p</th><th>p (Holm)</th><th class='t'>verdict</th></tr></thead><tbody>",
        ]
        for method, metric, res in rows:
            info = _info(metric)
            v = _verdict(res, metric)
            cls = {"better": "better", "worse": "worse"}.get(v, "")
            delta = (
                f"{info.format(res['difference'])} "
                f"<span class='ci'>[{info.format(res['low'])}, {info.format(res['high'])}]</span>"
            )
            out.append(
                f"<tr class='{cls}'><td class='t'>{_e(method)}</td>"
                f"<td class='t'>{_e(info.header())}</td><td>{res['n']}</td>"
                f"<td>{info.format(res['mean_a'])}</td><td>{info.format(res['mean_b'])}</td>"
                f"<td>{delta}</td><td>{_fmt_p(res['p_value'])}</td>"
                f"<td>{_fmt_p(res.get('p_holm'))}</td><td class='t'>{_e(v)}</td></tr>"
            )
        out.append("</tbody></table></div>")

    # box plot
    out.append("<h2 id='dice'>Dice per structure</h2>")
    uri = _data_uri(ctx.boxplot) if ctx.boxplot is not None else None
    if uri:
        out.append(
            f"<figure><img src='{uri}' alt='per-structure Dice box plot'>"
            "<figcaption>Per-structure Dice over the pairs that finished "
            "(dice_boxplot.png).</figcaption></figure>"
        )
    else:
        out.append("<p class='note'>No per-structure Dice in these records.</p>")

    # failures
    if ctx.failures:
        out += [
            "<h2 id='failures'>Failures</h2>",
            "<table><thead><tr><th class='t'>method</th><th class='t'>pair</th>"
            "<th class='t'>error</th></tr></thead><tbody>",
        ]
        for f in ctx.failures:
            out.append(
                f"<tr class='failed'><td class='t'>{_e(f['method'])}</td>"
                f"<td class='t'>{_e(f['pair'])}</td><td class='err'>{_e(f['error'])}</td></tr>"
            )
        out.append("</tbody></table>")

    # per pair
    out += [
        "<h2 id='pairs'>Per-pair results</h2>",
        "<p class='note'>Pair: moving → fixed (hover for the full paths).</p>",
        "<div class='wide'><table><thead><tr><th class='t'>pair</th><th class='t'>method</th>",
    ]
    out += [f"<th>{_e(_info(mt).header())}</th>" for mt in ctx.metrics]
    out.append("<th class='t'>status</th></tr></thead><tbody>")
    ordered = _sorted_records(ctx)
    for i, r in enumerate(ordered):
        failed = not _ok(r)
        first = i == 0 or str(ordered[i - 1]["pair"]) != str(r["pair"])
        pair_cell = ""
        if first:
            span = sum(1 for x in ordered if str(x["pair"]) == str(r["pair"]))
            fixed, moving = r.get("fixed") or "—", r.get("moving") or "—"
            pair_cell = (
                f"<td class='t' rowspan='{span}' title='fixed: {_e(fixed)}&#10;moving: "
                f"{_e(moving)}'>{_e(r['pair'])}<br><span class='n'>"
                f"{_e(Path(str(moving)).name)} → {_e(Path(str(fixed)).name)}</span></td>"
            )
        cells = "".join(f"<td>{_info(mt).format(_finite(r.get(mt)))}</td>" for mt in ctx.metrics)
        status = f"<td class='err'>{_e(r['error'])}</td>" if failed else "<td class='t'>ok</td>"
        classes = " ".join(c for c, on in (("group", first), ("failed", failed)) if on)
        out.append(
            f"<tr class='{classes}'>{pair_cell}<td class='m'>{_e(r['method'])}</td>"
            f"{cells}{status}</tr>"
        )
    out.append("</tbody></table></div>")

    # QC figures
    out.append("<h2 id='qc'>Quality-control figures</h2>")
    qc = [r for r in _sorted_records(ctx) if r.get("qc_png")]
    if not qc:
        out.append("<p class='note'>No QC figures in these records.</p>")
    elif len(qc) > 4:
        out.append(
            "<p class='note'>The first pair's figures are open; click a line to open the "
            "others.</p>"
        )
    for r in qc:
        p = Path(str(r["qc_png"]))
        uri = _data_uri(p if p.is_absolute() else ctx.outdir / p)
        caption = f"{r['method']} — {r['pair']}"
        dice = _finite(r.get("dice_mean"))
        if dice is not None:
            caption += f" (Dice {dice:.3f})"
        opened = " open" if len(qc) <= 4 or str(r["pair"]) == str(qc[0]["pair"]) else ""
        body = (
            f"<img src='{uri}' alt='QC figure {_e(caption)}'>"
            if uri
            else f"<p class='err'>QC figure not found: {_e(r['qc_png'])}</p>"
        )
        out.append(f"<details{opened}><summary>{_e(caption)}</summary>{body}</details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _sorted_records(ctx: _Context) -> list[dict]:
    pi = {p: i for i, p in enumerate(ctx.pairs)}
    mi = {m: i for i, m in enumerate(ctx.methods)}
    return sorted(ctx.records, key=lambda r: (pi[str(r["pair"])], mi[str(r["method"])]))


def _render_markdown(ctx: _Context) -> str:
    ref = ctx.comparison.get("reference")
    pct = f"{100 * ctx.confidence:g}%"
    lines = [
        f"# {_md(ctx.title)}",
        "",
        f"Generated {ctx.created} · learnreg {__version__} · {len(ctx.methods)} method(s) · "
        f"{len(ctx.pairs)} pair(s) · {len(ctx.failures)} failed · reference: {_md(ref or '—')}",
        "",
        "## Summary per method",
        "",
        f"Mean [{pct} bootstrap CI] over the pairs that finished (n = pairs with a value).",
        "",
        *(
            [f"**{_small_sample_note(len(ctx.pairs))}**", ""]
            if 0 < len(ctx.pairs) < SMALL_SAMPLE
            else []
        ),
        "| method | pairs ok / failed | "
        + " | ".join(_md(_info(m).header()) for m in ctx.metrics)
        + " |",
        "|---|---:|" + "---:|" * len(ctx.metrics),
    ]
    for method in ctx.methods:
        ok, failed = _counts(ctx, method)
        cells = [_summary_cells(ctx, method, mt, False)[1] for mt in ctx.metrics]
        lines.append(f"| {_md(method)} | {ok} / {failed} | " + " | ".join(cells) + " |")
    rows = list(_comparison_rows(ctx))
    lines += ["", f"## Paired comparisons against {_md(ref or '—')}", ""]
    if rows:
        lines += [
            f"Δ = method − {_md(ref)} [{pct} bootstrap CI]; p: two-sided Wilcoxon signed-rank; "
            "Holm-adjusted over methods.",
            "",
            "| method | metric | n | Δ [CI] | p | p (Holm) | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for method, metric, res in rows:
            info = _info(metric)
            delta = (
                f"{info.format(res['difference'])} "
                f"[{info.format(res['low'])}, {info.format(res['high'])}]"
            )
            lines.append(
                f"| {_md(method)} | {_md(info.header())} | {res['n']} | {delta} | "
                f"{_fmt_p(res['p_value'])} | {_fmt_p(res.get('p_holm'))} | "
                f"{_verdict(res, metric)} |"
            )
    else:
        lines.append("Only one method: nothing to compare.")
    if ctx.boxplot is not None:
        lines += ["", "## Dice per structure", "", f"![per-structure Dice]({ctx.boxplot.name})"]
    if ctx.failures:
        lines += ["", "## Failures", "", "| method | pair | error |", "|---|---|---|"]
        lines += [
            f"| {_md(f['method'])} | {_md(f['pair'])} | `{_md(f['error'])}` |" for f in ctx.failures
        ]
    lines += [
        "",
        "## Per-pair results",
        "",
        "| pair | method | "
        + " | ".join(_md(_info(m).header()) for m in ctx.metrics)
        + " | status |",
        "|---|---|" + "---:|" * len(ctx.metrics) + "---|",
    ]
    for r in _sorted_records(ctx):
        cells = " | ".join(_info(mt).format(_finite(r.get(mt))) for mt in ctx.metrics)
        status = "ok" if _ok(r) else f"**failed**: {_md(r['error'])}"
        qc = f" ([QC]({_md(r['qc_png'])}))" if r.get("qc_png") else ""
        lines.append(f"| {_md(r['pair'])} | {_md(r['method'])} | {cells} | {status}{qc} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry point
def write_report(
    records: Sequence[Mapping],
    outdir: str | os.PathLike,
    title: str = "learnreg evaluation",
    reference: str | None = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    label_names: Mapping[str, str] | None = None,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the evaluation report of ``records`` into ``outdir``; return the files written.

    Args:
        records: one dict per (method, pair) in the schema of :mod:`learnreg.runner.evaluate`;
            ``qc_png`` paths are relative to ``outdir`` (or absolute) and are embedded.
        reference: method the others are compared with (default: the first method seen).
        metrics: scalar metrics summarized and compared (those without any value are left
            out of the tables).
        label_names: optional names of the structures (label key → name) for the box plot.
        n_resamples, confidence, seed: of the bootstrap confidence intervals.

    Returns ``{"results": results.csv, "per_structure": per_structure.csv, "summary":
    summary.json, "dice_boxplot": dice_boxplot.png (only when records carry Dice),
    "html": report.html, "markdown": report.md}``. Every file appears complete or not at all,
    and an exception leaves ``outdir`` unchanged.
    """
    records = [dict(r) for r in records]
    for i, r in enumerate(records):
        for key in ("method", "pair"):
            if key not in r:
                raise ValueError(f"record {i} has no {key!r}: {sorted(r)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    methods = methods_in(records)
    if reference is not None and reference not in methods:
        raise ValueError(f"reference method {reference!r} not in the records; have {methods}")
    summary = summarize(records, metrics, n_resamples, confidence, seed)
    comparison = compare(records, reference, metrics, n_resamples, confidence, seed)
    present = [mt for mt in metrics if any(summary[m][mt]["n"] > 0 for m in methods)]
    failures = [
        {"method": r["method"], "pair": r["pair"], "error": str(r["error"])}
        for r in records
        if not _ok(r)
    ]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=outdir))
    try:
        files: dict[str, str] = {}
        columns, rows = _results_rows(records)
        _write_csv(staging / "results.csv", columns, rows)
        files["results"] = "results.csv"
        names = {str(k): str(v) for k, v in label_names.items()} if label_names else None
        _write_csv(
            staging / "per_structure.csv",
            _PER_STRUCTURE_COLUMNS + (("name",) if names else ()),
            _per_structure_rows(records, names),
        )
        files["per_structure"] = "per_structure.csv"

        payload = {
            "title": title,
            "created": created,
            "learnreg_version": __version__,
            "methods": methods,
            "pairs": _pairs_in(records),
            "n_records": len(records),
            "metrics": list(metrics),
            "bootstrap": {"n_resamples": n_resamples, "confidence": confidence, "seed": seed},
            "reference": comparison["reference"],
            "summary": summary,
            "comparisons": comparison["comparisons"],
            "failures": failures,
        }
        text = json.dumps(_jsonable(payload), indent=2, allow_nan=False, ensure_ascii=False)
        (staging / "summary.json").write_text(text + "\n", encoding="utf-8")
        files["summary"] = "summary.json"

        fig = dice_boxplot_figure(records, label_names, title)
        boxplot = None
        if fig is not None:
            save_figure(fig, staging / "dice_boxplot.png", dpi=100)
            # save_figure's temporary file is private (0600): give it the mode of the others
            mode = (staging / "results.csv").stat().st_mode & 0o777
            os.chmod(staging / "dice_boxplot.png", mode)
            files["dice_boxplot"] = "dice_boxplot.png"
            boxplot = staging / "dice_boxplot.png"

        ctx = _Context(
            title=title,
            created=created,
            records=records,
            methods=methods,
            pairs=_pairs_in(records),
            metrics=present,
            summary=summary,
            comparison=comparison,
            failures=failures,
            confidence=confidence,
            n_resamples=n_resamples,
            boxplot=boxplot,
            outdir=outdir,
        )
        (staging / "report.html").write_text(_render_html(ctx), encoding="utf-8")
        files["html"] = "report.html"
        (staging / "report.md").write_text(_render_markdown(ctx), encoding="utf-8")
        files["markdown"] = "report.md"

        for name in files.values():
            os.replace(staging / name, outdir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: outdir / name for key, name in files.items()}
