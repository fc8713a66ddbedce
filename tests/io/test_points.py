"""Point-set CSV files (RAS by default, LPS for ITK/ANTs)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from learnreg.core.errors import InputError
from learnreg.io import read_point_table, read_points, write_affine, write_points
from learnreg.spatial import AffineTransform


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.mark.parametrize("d", [2, 3])
def test_round_trip_keeps_values_and_extra_columns(tmp_path, d):
    pts = torch.from_numpy(np.random.default_rng(d).uniform(-100, 100, (5, d)))
    extra = {"label": ["a", "b", "c", "d", "e"], "index": [1, 2, 3, 4, 5]}
    write_points(tmp_path / "p.csv", pts, extra=extra)
    rows = _rows(tmp_path / "p.csv")
    assert rows[0] == ["x", "y", "z"][:d] + ["label", "index"]
    np.testing.assert_array_equal(np.array(rows[1:])[:, :d].astype(float), pts.numpy())
    back, ext = read_point_table(tmp_path / "p.csv")
    assert back.shape == (5, d) and back.dtype == torch.float64
    torch.testing.assert_close(back, pts, rtol=0, atol=0)  # full precision
    assert ext == {"label": list("abcde"), "index": ["1", "2", "3", "4", "5"]}
    # rewrite with the extra columns read back: identical file
    write_points(tmp_path / "q.csv", back, extra=ext)
    assert _rows(tmp_path / "q.csv") == rows


def test_lps_files_flip_x_and_y(tmp_path):
    pts = torch.tensor([[1.5, -2.0, 3.0], [-4.0, 5.0, -6.25]], dtype=torch.float64)
    write_points(tmp_path / "lps.csv", pts, space="LPS", extra={"t": [0, 0]})
    rows = _rows(tmp_path / "lps.csv")
    assert rows[0] == ["x", "y", "z", "t"]
    assert [list(map(float, r[:3])) for r in rows[1:]] == [[-1.5, 2.0, 3.0], [4.0, -5.0, -6.25]]
    torch.testing.assert_close(read_points(tmp_path / "lps.csv", space="LPS"), pts)
    torch.testing.assert_close(
        read_points(tmp_path / "lps.csv"), pts * torch.tensor([-1.0, -1.0, 1.0], dtype=pts.dtype)
    )


def test_header_is_case_insensitive_and_ndim_can_be_forced(tmp_path):
    (tmp_path / "p.csv").write_text("X, Y ,Z,t,comment\n1,2,3,0,first\n4,5,6,0,second\n\n")
    pts, extra = read_point_table(tmp_path / "p.csv")
    np.testing.assert_array_equal(pts.numpy(), [[1, 2, 3], [4, 5, 6]])
    assert list(extra) == ["t", "comment"] and extra["comment"] == ["first", "second"]
    p2, extra2 = read_point_table(tmp_path / "p.csv", ndim=2)
    np.testing.assert_array_equal(p2.numpy(), [[1, 2], [4, 5]])
    assert list(extra2) == ["Z", "t", "comment"]


def test_points_match_antspyx_in_lps(tmp_path):
    """ANTs reads our LPS CSV and maps fixed points as our affine does."""
    ants = pytest.importorskip("ants")
    import pandas as pd

    m = np.eye(4)
    m[:3, :3] += np.random.default_rng(0).uniform(-0.1, 0.1, (3, 3))
    m[:3, 3] = [5.0, -7.0, 2.0]
    affine = AffineTransform(torch.from_numpy(m))
    write_affine(tmp_path / "a.mat", affine)
    pts = torch.from_numpy(np.random.default_rng(1).uniform(-60, 60, (6, 3)))
    write_points(tmp_path / "p.csv", pts, space="LPS", extra={"t": [0] * 6})
    out = ants.apply_transforms_to_points(
        3, pd.read_csv(tmp_path / "p.csv"), [str(tmp_path / "a.mat")]
    )
    out.to_csv(tmp_path / "out.csv", index=False)
    mapped = read_points(tmp_path / "out.csv", space="LPS")
    np.testing.assert_allclose(mapped.numpy(), affine(pts).numpy(), atol=1e-3)


def test_errors_name_the_file(tmp_path):
    cases = {
        "noz.csv": ("x,y,label\n1,2,a\n", {"ndim": 3}, "missing column"),
        "noy.csv": ("x,z\n1,2\n", {}, r"missing column\(s\) y"),
        "word.csv": ("x,y,z\n1,two,3\n", {}, r"line 2: column 'y' value 'two' is not a number"),
        "nan.csv": ("x,y\n1,nan\n", {}, "line 2"),
        "ragged.csv": ("x,y,z\n1,2\n", {}, "line 2 has 2 fields"),
        "empty.csv": ("", {}, "empty"),
        "dup.csv": ("x,y,x\n1,2,3\n", {}, "more than once"),
    }
    for name, (text, kwargs, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=pattern) as err:
            read_points(tmp_path / name, **kwargs)
        assert name in str(err.value), str(err.value)
    with pytest.raises(InputError, match=r"missing\.csv: file not found"):
        read_points(tmp_path / "missing.csv")
    with pytest.raises(InputError, match=r"p\.csv: space"):
        read_points(tmp_path / "p.csv", space="XYZ")
    with pytest.raises(InputError, match=r"w\.csv.*shape"):
        write_points(tmp_path / "w.csv", torch.zeros(3, 4))
    with pytest.raises(InputError, match=r"w\.csv.*3 values for 2 points"):
        write_points(tmp_path / "w.csv", torch.zeros(2, 3), extra={"t": [0, 0, 0]})
    with pytest.raises(InputError, match=r"nowhere.*w\.csv"):
        write_points(tmp_path / "nowhere" / "w.csv", torch.zeros(2, 3))
    assert not (tmp_path / "w.csv").exists()
