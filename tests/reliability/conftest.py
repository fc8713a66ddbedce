"""The reliability suite's harness: run a command in-process, as the console script does,
and check how it ended — exit code, one message line naming the file and the problem, no
traceback, and the state of the output folder afterwards.

Inputs are small real images (LPBA40 at 8 mm, ANTs' 2D brain slices at 64×64) so that each
case costs well under a second; commands that register use a classical configuration of a
few iterations (``fast.yaml``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from learnreg.cli.main import main
from learnreg.core.run_folder import MARKER

FAST_CONFIG = {
    "init": "com",
    "linear": [{"model": "affine", "metric": "ncc", "shrink": [1], "iterations": [5]}],
    "deformable": {
        "model": "svf",
        "metric": "lncc",
        "shrink": [1],
        "velocity_shrink": [2],
        "iterations": [5],
    },
}


@dataclass
class Outcome:
    """How a command ended."""

    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def lines(self) -> list[str]:
        return [x for x in self.stderr.splitlines() if x.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def cli(*args: str | Path) -> Outcome:
    """``learnreg ARGS...`` in this process, as the console script runs it."""
    out, err = io.StringIO(), io.StringIO()
    code, exc = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # an escaped exception is what users see as a traceback
            exc, code = e, -1
    return Outcome(code, out.getvalue(), err.getvalue(), exc)


def fast_register(inputs, *extra, fixed=None, moving=None, out="out") -> Outcome:
    """``learnreg register`` of the small pair (or ``fixed``/``moving``) into ``out`` with the
    fast configuration, no QC figure; ``extra`` flags appended."""
    return cli(
        "register",
        fixed or inputs["fixed"],
        moving or inputs["moving"],
        "-o",
        out,
        "--config",
        inputs["config"],
        "-q",
        "--no-qc",
        *extra,
    )


def assert_refused(outcome: Outcome, *needles: str, code: int = 2) -> str:
    """The command failed cleanly: exit ``code``, one ``error:`` line holding every needle
    (file names, the problem), no traceback. Returns that line."""
    assert outcome.exception is None, f"escaped {outcome.exception!r}\n{outcome}"
    assert outcome.code == code, str(outcome)
    assert "Traceback" not in outcome.stderr + outcome.stdout, str(outcome)
    errors = [x for x in outcome.lines if x.startswith("error:")]
    assert len(errors) == 1, str(outcome)
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def assert_succeeded(outcome: Outcome) -> None:
    assert outcome.exception is None, f"escaped {outcome.exception!r}\n{outcome}"
    assert outcome.code == 0, str(outcome)
    assert "Traceback" not in outcome.stderr, str(outcome)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden ones included): relative path → (size, mtime)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Staging folders, locks and temporary files a run left in ``parent`` or below."""
    return sorted(
        str(p.relative_to(parent))
        for p in parent.rglob(".*")
        if (p.name.startswith((".learnreg", ".tmp")) or p.name.endswith(".tmp"))
        and p.name != MARKER
    )


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return path


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, data_root: Path) -> dict[str, Path]:
    """Small real inputs: 3D LPBA40 S01/S11 at 8 mm with labels, 2D slices at 64×64, the
    fast configuration; read-only by convention (cases copy what they corrupt)."""
    import SimpleITK as sitk

    from learnreg.io.images import read_image, read_labels
    from learnreg.spatial.sampling import resample

    root = tmp_path_factory.mktemp("inputs")
    lp = data_root / "lpba40"
    made: dict[str, Path] = {}
    for role, sid in (("fixed", "S01"), ("moving", "S11")):
        img = read_image(lp / "images" / f"{sid}.nii.gz")
        lab = read_labels(lp / "labels" / f"{sid}.nii.gz")
        grid = img.grid.downsampled(8.0)
        small = resample(img, grid)
        labels = resample(lab, grid, mode="label")
        made[role] = _save(root / f"{role}.nii.gz", small.data[0].numpy(), grid.affine)
        made[f"{role}_labels"] = _save(
            root / f"{role}_labels.nii.gz", labels.data[0].numpy(), grid.affine, np.int16
        )
    for role, name in (("fixed2d", "r16slice.jpg"), ("moving2d", "r64slice.jpg")):
        im = sitk.ReadImage(str(data_root / "ants2d" / name), sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(im)[::4, ::4].T  # (x, y), 64×64
        made[role] = _save(root / f"{role}.nii.gz", arr, np.diag([4.0, 4.0, 1.0, 1.0]))
    made["config"] = root / "fast.yaml"
    made["config"].write_text(yaml.safe_dump(FAST_CONFIG), encoding="utf-8")
    return made


@pytest.fixture
def work(tmp_path: Path, monkeypatch) -> Path:
    """A fresh working folder, the current directory of the case."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def registered(inputs, tmp_path_factory) -> Path:
    """A result folder of a fast 3D registration (made once; cases copy what they damage)."""
    out = tmp_path_factory.mktemp("registered") / "run"
    assert_succeeded(fast_register(inputs, out=out))
    return out


def environment_without_pythonpath() -> dict[str, str]:
    """The environment for a subprocess running the console script."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


SCRIPT = Path(sys.executable).with_name("learnreg")
