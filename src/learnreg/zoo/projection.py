"""2D/3D registration by a trained projection method: the pose of a volume from an X-ray.

For a model whose method is a :attr:`~learnreg.methods.base.RegistrationMethod.projection`
method (e.g. ``miao-pehl``): the 3D moving volume is put on the model's network grid by its
recorded preprocessing (as in :func:`learnreg.zoo.predict.predict`); the 2D fixed X-ray is
resampled onto the model's detector (:func:`detector_grid`) — its header's pixel spacing is
read as mm per pixel *in the detector plane* (the model's ``pixel_spacing`` is too; a cone
beam magnifies the isocentre plane by ``detector_distance / source_distance``), the X-ray's
centre is taken as the central ray's pierce point and its array axes as the detector axes in
order (the two world axes other than the beam's); its intensities are used as they are, so
they must be line integrals on the scale of the model's DRRs of preprocessed volumes. The
imaging system's frame is the volume's network-grid world (RAS mm) with the isocentre at that
grid's centre; the network predicts the pose ``T`` (system world → volume world).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from learnreg.core.errors import InputError
from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.spatial.affine import AffineTransform
from learnreg.spatial.projection import ProjectionGeometry
from learnreg.zoo.models import PretrainedModel

__all__ = ["ProjectionResult", "detector_grid", "check_projection_pair", "predict_pose"]


@dataclass
class ProjectionResult:
    """A 2D/3D registration: the volume's pose and the DRR at it.

    Attributes:
        pose: system world → volume world (RAS mm), a 3D rigid :class:`AffineTransform`.
        drr: the DRR of the preprocessed volume at ``pose`` on the detector grid.
        xray: the fixed X-ray as the network saw it (on the detector grid).
        volume_grid: the volume's network grid (its centre is the isocentre).
        geometry: the imaging system.
        info: what ran, timings, the pose parameters.
    """

    pose: AffineTransform
    drr: Image
    xray: Image
    volume_grid: Grid
    geometry: ProjectionGeometry
    info: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return 3


def detector_grid(xray: Image, geometry: ProjectionGeometry) -> Grid:
    """The model's detector (its pixels and pixel spacing) as a 2D grid centred on the
    X-ray's field of view, along the X-ray's index axes."""
    direction = np.asarray(xray.grid.direction)
    spacing = np.asarray(geometry.pixel_spacing, dtype=np.float64)
    shape = np.asarray(geometry.detector)
    origin = np.asarray(xray.grid.center) - direction @ ((shape - 1) / 2 * spacing)
    return Grid(
        tuple(int(s) for s in shape),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(map(tuple, direction)),
    )


def check_projection_pair(xray: Image, volume: Image, model: PretrainedModel) -> None:
    """Raise :class:`InputError` unless ``xray`` is a one-channel 2D image and ``volume`` a
    one-channel 3D volume with finite values, as the model's projection method takes."""
    if not model.method.projection:
        raise InputError(f"{model.path or model.name}: {model.method.name} is not a 2D/3D method")
    for im, nd, what in ((xray, 2, "the fixed X-ray"), (volume, 3, "the moving volume")):
        if im.ndim != nd:
            raise InputError(
                f"{im.name} is {im.ndim}D: {model.method.name} registers a 2D X-ray (fixed) to "
                f"a 3D volume (moving); {what} must be {nd}D"
            )
        if im.channels != 1:
            raise InputError(f"{im.name} has {im.channels} channels; {what} must have one")
        im.validate_intensities()


def predict_pose(
    xray: Image, volume: Image, model: PretrainedModel, device: torch.device | str = "cpu"
) -> ProjectionResult:
    """The pose of ``volume`` that ``model`` reads off ``xray`` (see the module docstring)."""
    check_projection_pair(xray, volume, model)
    t0 = time.perf_counter()
    grid = model.grid_for(volume)
    geometry = model.method.projection_geometry(grid)
    det = detector_grid(xray, geometry)
    vol = model.preprocessor.image(volume, grid)
    # the X-ray's own intensities (no normalization), antialiased when the detector is coarser
    on_detector = Preprocessor(NetworkGrid(), percentiles=None).image(xray, det)
    dev = torch.device(device)
    net = model.method.to(dev)
    try:
        out = net.predict(on_detector.batch().to(dev), vol.batch().to(dev), grid)
    finally:
        net.to("cpu")
    pose = AffineTransform(out.transform.homogeneous().detach().cpu().double())
    drr = Image(out.extras["drr"][0].detach().cpu().float(), det, "drr")
    params = out.extras.get("params")
    info = {
        "method": "model",
        "kind": "projection",
        "model": model.name,
        "network": model.method.name,
        "device": str(dev),
        "network_grid": grid.to_dict(),
        "detector_grid": det.to_dict(),
        "isocenter": list(grid.center),
        "geometry": {
            "detector": list(geometry.detector),
            "pixel_spacing": list(geometry.pixel_spacing),
            "source_distance": geometry.source_distance,
            "detector_distance": geometry.detector_distance,
            "beam_axis": geometry.beam_axis,
            "samples": geometry.samples,
            "depth": geometry.depth,
        },
        "pose_parameters": None if params is None else params[0].detach().cpu().tolist(),
        "seconds": time.perf_counter() - t0,
    }
    return ProjectionResult(pose, drr, on_detector, grid, geometry, info)
