"""Real 2D data with labels for fast tests: the middle axial slice (index 80 of 160) of LPBA40
T1 volumes and their label maps (1 mm), and their images on a 2 mm network grid (80×96)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from learnreg.core.grid import Grid
from learnreg.core.image import Image
from learnreg.data.preprocess import NetworkGrid, Preprocessor
from learnreg.io.images import read_image, read_labels

AXIAL = 80


def axial_slices(lpba: Path, names: Sequence[str]) -> tuple[dict, dict]:
    """``(images, labels)``: ``name → Image`` 2D slices at 1 mm (labels int64)."""
    images, labels = {}, {}
    for n in names:
        for out, read, folder in ((images, read_image, "images"), (labels, read_labels, "labels")):
            im = read(lpba / folder / f"{n}.nii.gz")
            out[n] = Image(im.data[..., AXIAL].clone(), Grid(im.grid.shape[:2]), n)
    return images, labels


def on_network_grid(images: dict, shape=(80, 96)) -> tuple[dict, Grid, Preprocessor]:
    """The images on one network grid (2 mm over the first one's field of view)."""
    pre = Preprocessor(NetworkGrid(shape), percentiles=None)
    grid = pre.grid_for(next(iter(images.values())))
    return {n: pre.image(im, grid) for n, im in images.items()}, grid, pre


def write_slice_folders(lpba: Path, names: Sequence[str], out: Path) -> Path:
    """The axial slices of ``names`` written as 2D NIfTI files under ``out/images`` and
    ``out/labels`` (a data folder a training config can name); returns ``out``."""
    from learnreg.io.images import write_image

    images, labels = axial_slices(lpba, names)
    for folder, source in (("images", images), ("labels", labels)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for n, im in source.items():
            write_image(im, out / folder / f"{n}.nii.gz")
    return out
