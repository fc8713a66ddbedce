"""The files of a registration: warped image, transforms, Jacobian map, QC figure, metrics."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from learnreg.core.image import Image
from learnreg.io.images import write_image
from learnreg.io.result import save_result, write_json
from learnreg.losses import functional as L
from learnreg.metrics import determinant_stats, score_result
from learnreg.optimize.config import is_multimodal
from learnreg.spatial.result import RegistrationResult
from learnreg.spatial.sampling import resample

__all__ = ["write_outputs"]


def write_outputs(
    result: RegistrationResult,
    fixed: Image,
    moving: Image,
    folder: Path,
    fixed_labels: Image | None = None,
    moving_labels: Image | None = None,
    qc: bool = False,
    formats: Sequence[str] = ("ants",),
    jacobian: bool = False,
    warp_grid: str = "native",
) -> dict:
    """Write the warped image, the transforms and ``metrics.json`` into ``folder``; with
    ``jacobian`` the determinant map ``jacobian.nii.gz``, with ``qc`` the figure ``qc.png``
    and the image similarity in ``metrics.json``.

    ``metrics.json`` holds the time, peak memory, with ``qc`` the local NCC after the affine
    part and after all, and, from :func:`learnreg.metrics.score_result` (the scores ``learnreg evaluate``
    records too), the Jacobian statistics of the deformable part and the mean Dice of the
    label-warped moving labels after the affine part and after all. ``formats`` are the
    transform file sets (:data:`learnreg.io.result.FORMATS`), ``warp_grid`` where warps are
    written (:data:`learnreg.io.result.WARP_GRIDS`). The map and the QC are optional because
    they cost more than the rest together on a 1 mm brain (0.2 s and 6 s of 7 s)."""
    folder = Path(folder)
    warped = result.warp(moving)
    write_image(warped, folder / "warped.nii.gz")
    save_result(result, folder, formats, warp_grid)
    jac = result.jacobian_determinant()
    if jacobian:
        write_image(Image(jac[None], result.fixed_grid, "jacobian"), folder / "jacobian.nii.gz")
    labels = fixed_labels is not None and moving_labels is not None
    warped_labels = result.warp(moving_labels, mode="label") if labels else None
    scores = score_result(
        result,
        fixed_labels=fixed_labels if labels else None,
        moving_labels=moving_labels,
        metrics=("seconds", "dice"),
        warped_labels=warped_labels,
    )
    metrics: dict = {"seconds": scores["seconds"]}
    metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if qc:  # image similarity, with the figure: 1 s of a 1 mm brain's 2 s of outputs
        moved_affine = resample(moving, fixed.grid, result.linear())
        with torch.no_grad():
            f = fixed.batch().float()
            metrics["lncc_affine"] = -float(L.lncc(f, moved_affine.batch(), window=9))
            metrics["lncc_final"] = -float(L.lncc(f, warped.batch(), window=9))
    if result.deformable is not None:  # the statistics of the determinant map written
        metrics["jacobian"] = determinant_stats(jac)
    if labels:
        write_image(warped_labels, folder / "warped_labels.nii.gz")
        affine_only = RegistrationResult(result.fixed_grid, result.moving_grid, result.affine)
        metrics["dice_affine"] = score_result(
            affine_only, fixed_labels=fixed_labels, moving_labels=moving_labels, metrics=("dice",)
        )["dice_mean"]
        metrics["dice"] = scores["dice_mean"]
    if qc:
        from learnreg.eval.figures import qc_figure  # matplotlib: 0.7 s to import

        qc_figure(
            fixed.data[0].numpy(),
            resample(moving, fixed.grid).data[0].numpy(),
            warped.data[0].numpy(),
            folder / "qc.png",
            displacement=None
            if result.deformable is None
            else result.deformable.voxel_field()[0].numpy(),
            jacobian=jac.numpy() if result.deformable is not None else None,
            title=f"{Path(moving.name).name} → {Path(fixed.name).name}",
            grid=fixed.grid,
            multimodal=is_multimodal(result.info.get("config")),
        )
    write_json(folder / "metrics.json", metrics)
    return metrics
