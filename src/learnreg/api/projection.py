"""2D/3D registration in the API and on the command line: an X-ray (fixed) and a volume
(moving) registered by a trained projection method (:mod:`learnreg.zoo.projection`).

:func:`learnreg.api.registration.plan_registration` returns a :class:`ProjectionPlan` when the
checkpoint's method is a projection method and the pair is 2D/3D; ``learnreg register`` runs
and writes it as it does any plan. The result folder holds:

- ``affine.mat`` — the pose, an ITK ``AffineTransform_double_3_3`` (LPS) mapping points of the
  imaging system's frame to the volume (SimpleITK's ``ReadTransform`` gives the same 3D rigid
  transform); ``affine_inverse.mat`` its inverse (volume → system);
- ``drr.nii.gz`` — the DRR at that pose on the detector grid (2D NIfTI; compare with
  ``xray.nii.gz``, the X-ray as the network saw it on that grid);
- ``result.json`` — the pose (RAS matrix and the method's parameters), the imaging system,
  the grids and the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learnreg import __version__
from learnreg.core.errors import InputError
from learnreg.core.image import Image
from learnreg.io.images import write_image
from learnreg.io.result import write_json
from learnreg.io.transforms import write_affine
from learnreg.zoo.models import PretrainedModel
from learnreg.zoo.projection import ProjectionResult, predict_pose

__all__ = ["ProjectionPlan", "ProjectionRegistration", "FILES"]

FILES = {
    "affine": "affine.mat",
    "affine_inverse": "affine_inverse.mat",
    "drr": "drr.nii.gz",
    "xray": "xray.nii.gz",
}


class ProjectionRegistration:
    """The result of a :class:`ProjectionPlan`: :attr:`result` is the
    :class:`~learnreg.zoo.projection.ProjectionResult` (pose, DRR)."""

    def __init__(self, result: ProjectionResult, fixed: Image, moving: Image) -> None:
        self.result, self.fixed, self.moving = result, fixed, moving
        self.folder: Path | None = None

    def __repr__(self) -> str:
        return f"ProjectionRegistration(2D/3D rigid pose; {self.info.get('engine', '?')})"

    @property
    def info(self) -> dict:
        return self.result.info

    @property
    def pose(self) -> torch.Tensor:
        """The homogeneous pose ``(4, 4)`` (system world → volume world, RAS mm)."""
        return self.result.pose.homogeneous()[0]

    def write(
        self,
        folder: Path,
        qc: bool = False,
        formats: tuple[str, ...] = ("ants",),
        jacobian: bool = False,
        warp_grid: str = "native",
    ) -> dict:
        """Write the files of the module docstring into the existing ``folder``."""
        if qc or jacobian or tuple(formats) != ("ants",):
            raise InputError(
                "a 2D/3D registration writes the pose (affine.mat) and the DRR only: --qc, "
                "--jacobian and --output-format other than ants do not apply"
            )
        folder = Path(folder)
        r = self.result
        write_affine(folder / FILES["affine"], r.pose)
        write_affine(folder / FILES["affine_inverse"], r.pose.inverse())
        write_image(r.drr, folder / FILES["drr"])
        write_image(r.xray, folder / FILES["xray"])
        write_json(
            folder / "result.json",
            {
                "learnreg_version": __version__,
                "kind": "projection",
                "ndim": "2D/3D",
                "fixed": self.fixed.name,
                "moving": self.moving.name,
                "files": dict(FILES),
                "pose_ras": self.pose.double().tolist(),
                "frames": (
                    "affine.mat maps imaging-system points to volume points (ITK, LPS); the "
                    "system frame is the volume's world with the isocentre at network_grid's "
                    "centre and the beam along world axis geometry.beam_axis"
                ),
                "info": r.info,
            },
        )
        self.folder = folder
        return {}


@dataclass
class ProjectionPlan:
    """A checked 2D/3D registration, ready to run (as a
    :class:`~learnreg.api.registration.RegistrationPlan`)."""

    fixed: Image
    moving: Image
    model: PretrainedModel
    why: str
    device: torch.device = torch.device("cpu")

    def run(self, progress: Any = None) -> ProjectionRegistration:
        t0 = time.perf_counter()
        result = predict_pose(self.fixed, self.moving, self.model, self.device)
        result.info["seconds"] = time.perf_counter() - t0
        result.info["engine"] = self.why
        return ProjectionRegistration(result, self.fixed, self.moving)
