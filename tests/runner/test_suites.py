"""Named suites: their pairs are the one Pair type, named as the records are stored."""

from __future__ import annotations

import pytest

from learnreg.core.errors import InputError
from learnreg.data.datasets import Pair
from learnreg.runner.suites import data_root, get_suite, suite_names


@pytest.fixture
def root(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / "lpba40" / sub).mkdir(parents=True)
        for s in ("S01", "S35", "S36"):
            (tmp_path / "lpba40" / sub / f"{s}.nii.gz").write_bytes(b"")
    return tmp_path


def test_lpba40_atlas_pairs(root):
    suite = get_suite("lpba40-atlas")
    assert "lpba40-atlas" in suite_names()
    pairs = suite.pairs(root, ["S35", "36"])
    base = root / "lpba40"
    assert pairs == [
        Pair(
            f"{s}_to_S01",
            base / "images/S01.nii.gz",
            base / f"images/{s}.nii.gz",
            base / "labels/S01.nii.gz",
            base / f"labels/{s}.nii.gz",
        )
        for s in ("S35", "S36")
    ]
    with pytest.raises(InputError, match="S01 is the fixed atlas"):
        suite.pairs(root, ["S01"])
    with pytest.raises(InputError, match="S77 is not in"):
        suite.pairs(root, ["S77"])


def test_data_root(root, tmp_path, monkeypatch):
    assert data_root(root) == root
    with pytest.raises(InputError, match="folder not found"):
        data_root(tmp_path / "missing")
    monkeypatch.setenv("LEARNREG_DATA", str(root))
    assert data_root() == root
