"""``learnreg demo``: real anatomy from a package registry, a known deformation, recovered.

The MNI152 (ICBM 2009a) T1 template and its tissue maps ship inside the ``nilearn`` wheel on
PyPI; the demo fetches the wheel with pip (no nilearn install needed), builds a moving image
by resampling the template through a known affine + smooth deformation onto an oblique,
anisotropic grid, registers it back with the default pipeline, and scores the recovery
against the known truth.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from learnreg.api.outputs import write_outputs
from learnreg.cli.progress import progress_display
from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.core.run_folder import output_folder
from learnreg.io.images import read_image, write_image
from learnreg.io.result import write_json
from learnreg.optimize.classical import register
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.base import TransformChain
from learnreg.spatial.displacement import DisplacementField
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import resample

__all__ = ["run_demo", "fetch_mni152"]

_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "learnreg"


def fetch_mni152(kinds: tuple[str, ...] = ("t1", "gm", "wm")) -> dict[str, Path]:
    """Paths of the MNI152 maps, fetched from the nilearn wheel on PyPI on first use."""
    out = cache_dir() / "mni152"
    paths = {k: out / Path(_MEMBER.format(k)).name for k in kinds}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "nilearn"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("nilearn-*.whl"))
        if done.returncode != 0 or not wheels:
            raise InputError(
                f"could not fetch the nilearn wheel from PyPI for the MNI152 template: "
                f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            for k, p in paths.items():
                tmp_file = p.with_suffix(".part")
                tmp_file.write_bytes(z.read(_MEMBER.format(k)))
                os.replace(tmp_file, p)
    return paths


def _known_transform(grid: Grid, seed: int = 0) -> TransformChain:
    """A smooth random deformation (≤ ~4 mm) then a 7° / 6 mm / 4 % affine, about the centre."""
    g = torch.Generator().manual_seed(seed)
    coarse = grid.resized([max(4, s // 8) for s in grid.shape])
    noise = gaussian_blur(torch.randn(1, grid.ndim, *coarse.shape, generator=g), 1.5)
    noise = noise * (4.0 / float(noise.abs().max()))  # mm
    field = DisplacementField.from_world(coarse, noise)
    a = math.radians(7.0)
    rot = (
        torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        * 1.04
    )
    centre = torch.tensor(grid.center)
    m = torch.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre.float() - rot @ centre.float() + torch.tensor([6.0, -3.0, 2.0])
    return TransformChain([field, AffineTransform(m)])


def run_demo(output: Path, overwrite: bool = False) -> dict:
    paths = fetch_mni152()
    template = read_image(paths["t1"])
    tissue = torch.stack([read_image(paths[k]).data[0] for k in ("gm", "wm")])
    labels = torch.where(tissue.max(0).values > 127, tissue.argmax(0) + 1, 0).to(torch.uint8)
    fixed = Image(template.data.float(), template.grid, "MNI152")
    fixed_labels = Image(labels[None], template.grid, "MNI152 tissue")

    # moving: the template seen through a known transform, on an oblique 1.3 mm grid
    truth = _known_transform(fixed.grid)
    b = math.radians(10.0)
    direction = ((math.cos(b), -math.sin(b), 0.0), (math.sin(b), math.cos(b), 0.0), (0.0, 0.0, 1.0))
    shape = tuple(int(s / 1.3) for s in fixed.grid.shape)
    centre = np.asarray(fixed.grid.center)
    half = np.asarray(direction) @ (1.3 * (np.asarray(shape) - 1) / 2)
    moving_grid = Grid(shape, (1.3,) * 3, tuple(centre - half), direction)
    # moving(y) = fixed(S(y)) with S the known map, so the true fixed→moving map is S⁻¹
    moving = resample(fixed, moving_grid, truth)
    moving.name = "moving (deformed MNI152)"
    moving_labels = resample(fixed_labels, moving_grid, truth, mode="label")
    moving_labels.name = "moving tissue"

    with output_folder(output, overwrite, "demo") as stage:
        write_image(fixed, stage / "fixed.nii.gz")
        write_image(moving, stage / "moving.nii.gz")
        t0 = time.perf_counter()
        with progress_display(False) as progress:
            result = register(fixed, moving, "default", progress=progress)
        result.info["seconds"] = time.perf_counter() - t0
        metrics = write_outputs(
            result, fixed, moving, stage, fixed_labels, moving_labels, qc=True, jacobian=True
        )
        # recovery: S(T(p)) should return p for points in the brain
        pts = fixed.grid.world_points()[labels > 0][::50]
        err = (truth(result.map_points(pts)[None])[0] - pts).norm(dim=-1)
        before = (truth(pts[None])[0] - pts).norm(dim=-1)
        metrics["recovery_error_mm"] = {
            "before_mean": float(before.mean()),
            "mean": float(err.mean()),
            "p95": float(err.quantile(0.95)),
        }
        write_json(stage / "metrics.json", metrics)
    r = metrics["recovery_error_mm"]
    print(
        f"registered in {result.info['seconds']:.1f} s; known-deformation error "
        f"{r['before_mean']:.2f} → {r['mean']:.2f} mm (95th pct {r['p95']:.2f}); "
        f"tissue Dice {metrics['dice_affine']:.3f} (affine) → {metrics['dice']:.3f}; "
        f"folds {metrics['jacobian']['folding_fraction']:.2e}"
    )
    print(f"outputs in {Path(output).resolve()}/ (open qc.png)")
    return metrics
