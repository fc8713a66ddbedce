"""write_report on synthetic records: every file, self-contained HTML, CSV columns, atomicity."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import learnreg.eval.report as report_mod
from learnreg.eval.figures import save_figure
from learnreg.eval.report import RECORD_COLUMNS, dice_boxplot_figure, write_report

LABELS = [str(v) for v in range(1, 57)]  # 56 structures, as LPBA40
ERROR = "RuntimeError: out of memory <allocating 2 GiB> & more"
N_RESAMPLES = 300


def _qc_png(path: Path) -> None:
    fig = Figure(figsize=(1.2, 1.0))
    fig.add_subplot().imshow(np.arange(16.0).reshape(4, 4), cmap="gray")
    save_figure(fig, path, dpi=40)


def _records(outdir: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for m, (method, shift) in enumerate((("affine", -0.1), ("svf", 0.0))):
        for p in range(4):
            pair = f"S{p + 2:02d}_to_S01"
            rec = {
                "method": method,
                "pair": pair,
                "fixed": "S01.nii.gz",
                "moving": f"S{p + 2:02d}.nii.gz",
            }
            if method == "svf" and p == 3:
                rec.update({k: None for k in RECORD_COLUMNS if k not in rec})
                rec.update(dice=None, hd95=None, error=ERROR)
                recs.append(rec)
                continue
            dice = np.clip(0.75 + shift + rng.normal(0, 0.05, len(LABELS)), 0, 1)
            hd = 3.0 - 5 * shift + rng.random(len(LABELS))
            qc = None
            if p == 0:
                qc = f"qc/{method}/{pair}.png"
                _qc_png(outdir / qc)
            rec.update(
                dice=dict(zip(LABELS, dice.tolist(), strict=True)),
                dice_mean=float(dice.mean()),
                hd95=dict(zip(LABELS, hd.tolist(), strict=True)),
                hd95_mean=float(hd.mean()),
                tre_mean=None,
                tre_max=None,
                folding_fraction=0.001 * m,
                folding_count=12 * m,
                sdlogj=0.05 * m,
                ice_mean=0.2 * m,
                seconds=1.0 + 10 * m + p,
                peak_memory_mb=900.0 + p,
                error=None,
                qc_png=qc,
            )
            recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    recs = _records(out)
    files = write_report(recs, out, title="demo <report>", n_resamples=N_RESAMPLES)
    return out, recs, files


def test_all_files_written(written):
    out, _, files = written
    names = {
        "results": "results.csv",
        "per_structure": "per_structure.csv",
        "summary": "summary.json",
        "dice_boxplot": "dice_boxplot.png",
        "html": "report.html",
        "markdown": "report.md",
    }
    assert {k: p.name for k, p in files.items()} == names
    for p in files.values():
        assert p.parent == out and p.is_file() and p.stat().st_size > 0
    assert files["dice_boxplot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_html_is_self_contained(written):
    out, recs, files = written
    text = files["html"].read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.I)
    assert refs, "expected embedded images and in-page links"
    for ref in refs:
        assert ref.startswith(("data:", "#")), ref
    assert "http" not in " ".join(refs)
    assert "<link" not in text and "<script" not in text and "@import" not in text
    # box plot and both QC figures embedded, byte for byte
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    blobs = {base64.b64decode(u) for u in uris}
    assert files["dice_boxplot"].read_bytes() in blobs
    for r in recs:
        if r.get("qc_png"):
            assert (out / r["qc_png"]).read_bytes() in blobs
    assert len(uris) == 3
    # failure listed with its (escaped) message; title escaped
    assert "RuntimeError: out of memory &lt;allocating 2 GiB&gt; &amp; more" in text
    assert ERROR not in text
    assert "<h1>demo &lt;report&gt;</h1>" in text
    assert "learnreg" in text and "95% CI" in text
    for needle in ("affine", "svf", "Wilcoxon", "S05_to_S01"):
        assert needle in text


def test_results_csv(written):
    _, recs, files = written
    with open(files["results"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(RECORD_COLUMNS)
    assert len(rows) == len(recs) == 8
    for row, rec in zip(rows, recs, strict=True):
        assert row["method"] == rec["method"] and row["pair"] == rec["pair"]
        if rec["error"]:
            assert row["error"] == ERROR and row["dice_mean"] == ""
        else:
            assert float(row["dice_mean"]) == rec["dice_mean"]  # full precision
            assert row["tre_mean"] == "" and row["error"] == ""


def test_per_structure_csv(written):
    _, recs, files = written
    with open(files["per_structure"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "pair", "label", "dice", "hd95"]
    assert len(rows) == 7 * len(LABELS)  # the failed pair has none
    assert [r["label"] for r in rows[: len(LABELS)]] == LABELS  # numeric order
    first = recs[0]
    assert float(rows[5]["dice"]) == first["dice"][LABELS[5]]
    assert float(rows[5]["hd95"]) == first["hd95"][LABELS[5]]


def test_summary_json(written):
    _, recs, files = written
    s = json.loads(files["summary"].read_text())
    assert s["methods"] == ["affine", "svf"] and s["reference"] == "affine"
    assert s["failures"] == [{"method": "svf", "pair": "S05_to_S01", "error": ERROR}]
    svf = s["summary"]["svf"]["dice_mean"]
    assert svf["n"] == 3
    ok = [r["dice_mean"] for r in recs if r["method"] == "svf" and not r["error"]]
    assert svf["mean"] == pytest.approx(np.mean(ok))
    assert s["summary"]["svf"]["tre_mean"] == {"mean": None, "low": None, "high": None, "n": 0}
    c = s["comparisons"]["svf"]["dice_mean"]
    assert c["n"] == 3 and c["difference"] > 0
    assert s["learnreg_version"]


def test_markdown(written):
    _, _, files = written
    md = files["markdown"].read_text()
    assert "## Summary per method" in md and "![per-structure Dice](dice_boxplot.png)" in md
    assert "**failed**" in md and "S05_to_S01" in md


def test_report_is_atomic(tmp_path, monkeypatch):
    recs = _records(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def boom(ctx):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report_mod, "_render_html", boom)
    with pytest.raises(RuntimeError, match="rendering failed"):
        write_report(recs, tmp_path, n_resamples=N_RESAMPLES)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # an earlier complete report survives a failed rewrite untouched
    monkeypatch.undo()
    files = write_report(recs, tmp_path, n_resamples=N_RESAMPLES)
    old = {k: p.read_bytes() for k, p in files.items()}
    monkeypatch.setattr(report_mod, "_render_markdown", boom)
    with pytest.raises(RuntimeError):
        write_report(recs[:3], tmp_path, title="other", n_resamples=N_RESAMPLES)
    assert {k: p.read_bytes() for k, p in files.items()} == old


def test_records_without_dice_or_with_one_method(tmp_path):
    recs = [{"method": "m", "pair": f"p{i}", "tre_mean": 1.0 + i, "error": None} for i in range(3)]
    files = write_report(recs, tmp_path, n_resamples=N_RESAMPLES)
    assert "dice_boxplot" not in files
    text = files["html"].read_text()
    assert "No per-structure Dice" in text and "nothing to compare" in text
    assert "TRE" in text and "Dice ↑" not in text  # columns only for metrics with values
    assert dice_boxplot_figure(recs) is None
    with pytest.raises(ValueError, match="reference"):
        write_report(recs, tmp_path, reference="other")


def test_missing_qc_png_is_reported(tmp_path):
    recs = [{"method": "m", "pair": "p", "dice_mean": 0.5, "qc_png": "qc/none.png"}]
    text = write_report(recs, tmp_path, n_resamples=N_RESAMPLES)["html"].read_text()
    assert "QC figure not found: qc/none.png" in text


def test_label_names_and_the_small_sample_note(tmp_path):
    recs = _records(tmp_path)  # 4 pairs: fewer than the report trusts
    names = {label: f"structure named {label}" for label in LABELS}
    files = write_report(recs, tmp_path, n_resamples=N_RESAMPLES, label_names=names)
    rows = list(csv.DictReader(open(files["per_structure"], encoding="utf-8")))
    assert rows and all(r["name"] == names[r["label"]] for r in rows)
    for key in ("html", "markdown"):
        assert "Only 4 pairs" in files[key].read_text(encoding="utf-8")
    six = [dict(r, pair=f"{r['pair']}{k}") for r in recs for k in ("", "b")]  # 8 pairs
    files = write_report(six, tmp_path / "eight", n_resamples=N_RESAMPLES)
    assert "Only" not in files["markdown"].read_text(encoding="utf-8")
    assert "name" not in open(files["per_structure"], encoding="utf-8").readline()
