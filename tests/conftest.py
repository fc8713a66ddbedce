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


@pytest.fixture(autouse=True)
def _one_thread_and_seeded():
    """Every test on one thread, torch's global generator seeded: results do not depend on
    the machine's core count (and training on 2 shared cores is several times faster on one
    thread than on two). numpy randomness is always an explicit ``default_rng(seed)``."""
    import torch

    from learnreg.core.locale_guard import keep_locale

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with keep_locale():  # ITK's DICOM writer sets the C locale process-wide
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """learnreg's on-disk caches (pre-alignments) in a folder of this test session."""
    old = os.environ.get("LEARNREG_CACHE")
    os.environ["LEARNREG_CACHE"] = str(tmp_path_factory.mktemp("learnreg-cache"))
    yield
    if old is None:
        os.environ.pop("LEARNREG_CACHE", None)
    else:
        os.environ["LEARNREG_CACHE"] = old
