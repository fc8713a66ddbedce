"""QC figures: helpers, 2D/3D rendering, orientation, atomic writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from learnreg.core.grid import Grid
from learnreg.eval.figures import (
    _orientation,
    _reorient,
    checkerboard,
    deformation_grid_lines,
    qc_figure,
)


def _smooth(shape, seed, sigma=3.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma)


def _field_with_fold(shape):
    x = np.indices(shape).astype(np.float64)
    c = np.array([(s - 1) / 2 + 0.3 for s in shape]).reshape(-1, *([1] * len(shape)))
    u = np.stack([2 * _smooth(shape, 10 + d, 5) for d in range(len(shape))])
    u[0] += -1.8 * (x[0] - c[0]) * np.exp(-((x - c) ** 2).sum(0) / (2 * 2.0**2))
    return u


def test_checkerboard():
    a, b = np.zeros((4, 6)), np.ones((4, 6))
    cb = checkerboard(a, b, tiles=2)
    np.testing.assert_array_equal(cb[:2, :3], 0)
    np.testing.assert_array_equal(cb[:2, 3:], 1)
    np.testing.assert_array_equal(cb[2:, :3], 1)
    np.testing.assert_array_equal(cb[2:, 3:], 0)
    cb3 = checkerboard(np.zeros((4, 4, 4)), np.ones((4, 4, 4)), tiles=2)
    assert cb3[0, 0, 0] == 0 and cb3[0, 0, 3] == 1 and cb3[3, 3, 0] == 0 and cb3.mean() == 0.5
    with pytest.raises(ValueError):
        checkerboard(a, np.ones((3, 6)))


def test_deformation_grid_lines():
    u = np.zeros((2, 9, 7))
    lines = deformation_grid_lines(u, 4)
    assert len(lines) == 3 + 2  # p = 0, 4, 8 and q = 0, 4
    np.testing.assert_array_equal(lines[1], np.stack([np.full(7, 4.0), np.arange(7.0)], -1))
    u[0], u[1] = 0.5, -1.0
    moved = deformation_grid_lines(u, 4)
    np.testing.assert_allclose(moved[1], lines[1] + [0.5, -1.0])


def test_orientation_to_ras():
    lps = Grid((4, 5, 6), (1.0, 2.0, 3.0), direction=((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
    perm, flips, spacing = _orientation(lps, 3)
    assert perm == [0, 1, 2] and flips == [True, True, False] and spacing == [1.0, 2.0, 3.0]
    vol = np.zeros((4, 5, 6))
    vol[3, 0, 0] = 1  # most left, most anterior voxel (LPS index order)
    ras = _reorient(vol, perm, flips)
    assert ras[0, 4, 0] == 1  # now at the lowest R and highest A index
    u = np.zeros((3, 4, 5, 6))
    u[0] = 1.0  # +1 voxel along i = towards left
    assert np.all(_reorient(u, perm, flips, vector=True)[0] == -1.0)
    # a permuted grid: index axis 0 points superior
    perm2, flips2, _ = _orientation(Grid((4, 5, 6), direction=((0, 1, 0), (0, 0, 1), (1, 0, 0))), 3)
    assert perm2 == [1, 2, 0] and flips2 == [False, False, False]


def _png_ok(path, min_px=300):
    assert path.exists() and path.stat().st_size > 20_000
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_px
    assert img[..., :3].std() > 0.05  # not blank
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_qc_figure_2d(tmp_path):
    shape = (64, 56)
    fixed = _smooth(shape, 0)
    moving = _smooth(shape, 1)
    u = _field_with_fold(shape)
    labels = (fixed > 0).astype(int) + (fixed > 0.5)
    out = qc_figure(
        fixed, moving, moving, tmp_path / "qc2d.png", displacement=u, labels=labels, title="2D"
    )
    _png_ok(out)


def test_qc_figure_3d(tmp_path):
    shape = (28, 32, 24)
    grid = Grid(shape, (1.0, 1.2, 2.0), direction=((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
    fixed = torch.from_numpy(_smooth(shape, 0))[None, None]  # (1, 1, *S) tensors accepted
    moving = _smooth(shape, 1)
    lab = (moving > 0).astype(np.uint8) * 21
    out = qc_figure(
        fixed,
        moving,
        moving,
        tmp_path / "sub" / "qc3d.png",
        displacement=torch.from_numpy(_field_with_fold(shape))[None],
        labels=(lab, lab),
        title="3D",
        grid=grid,
        slices=(13, 15, 11),
    )
    _png_ok(out, min_px=600)
    m2 = moving[:, :, 0]
    _png_ok(qc_figure(m2, m2, m2, tmp_path / "jac_only.png", jacobian=np.full(m2.shape, 0.9)))
    with pytest.raises(ValueError, match="shape"):
        qc_figure(moving, moving[:-1], moving, tmp_path / "bad.png")


def test_qc_figure_written_atomically(tmp_path, monkeypatch):
    shape = (32, 32)
    img = _smooth(shape, 0)
    path = tmp_path / "qc.png"
    path.write_bytes(b"previous figure")

    def broken_savefig(self, fname, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG partial")
        else:
            Path(fname).write_bytes(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        qc_figure(img, img, img, path)
    assert path.read_bytes() == b"previous figure"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]  # no temporary left behind
    with pytest.raises(RuntimeError):
        qc_figure(img, img, img, tmp_path / "new.png")
    assert not (tmp_path / "new.png").exists()


def _captured(monkeypatch) -> list:
    import learnreg.eval.figures as figures

    figs: list = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=100: figs.append(fig) or path)
    return figs


def test_2d_shown_as_viewers_show_it_with_titles_that_fit(tmp_path, monkeypatch):
    figs = _captured(monkeypatch)
    img = np.zeros((40, 30))
    img[:5, :5] = 1.0  # i < 5 (columns), j < 5 (rows): a viewer's top-left corner
    title = "a/very/long/path/to/the/moving/image/sub-01_ses-02_T1w.nii.gz → " * 3
    qc_figure(img, img, img, tmp_path / "q.png", title=title)
    fig = figs[0]
    ax = fig.axes[0]
    assert ax.images[0].origin == "upper"
    bottom, top = ax.get_ylim()
    assert bottom > top  # row 0 at the top
    shown = ax.images[0].get_array()
    assert shown[:5, :5].min() == 1.0 and shown.shape == (30, 40)  # rows × columns
    FigureCanvasAgg(fig).draw()
    box = fig._suptitle.get_window_extent()
    assert "\n" in fig._suptitle.get_text() and box.x0 >= 0 and box.x1 <= fig.bbox.x1


def test_multimodal_pairs_get_an_edge_overlay(tmp_path, monkeypatch):
    from learnreg.optimize.config import is_multimodal, preset

    figs = _captured(monkeypatch)
    img = _smooth((48, 40), 0)
    qc_figure(img, img, img, tmp_path / "q.png", multimodal=True)
    titles = [a.get_title() for a in figs[0].axes]
    assert any("fixed edges" in t for t in titles) and not any("|fixed" in t for t in titles)
    assert is_multimodal(preset("multimodal").to_dict()) and not is_multimodal(preset("default"))
