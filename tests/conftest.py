"""Shared fixtures: real data from ../shared/data, downsampled for speed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(
    os.environ.get("LEARNREG_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "lpba40").is_dir():
        pytest.fail(f"real test data not found at {DATA} (set LEARNREG_DATA)")
    return DATA.resolve()


@pytest.fixture(scope="session")
def lpba(data_root: Path) -> Path:
    return data_root / "lpba40"
