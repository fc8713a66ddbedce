"""``learnreg apply``: warp images, label maps and point sets with a saved result, or with
transform files made elsewhere (ANTs, ITK) given in antsApplyTransforms order."""

from __future__ import annotations

from pathlib import Path

from learnreg.cli.runtime import parse_transform_argument
from learnreg.core.errors import InputError
from learnreg.core.run_folder import output_folder
from learnreg.io.images import read_image, read_labels, write_image
from learnreg.io.points import read_point_table, write_points
from learnreg.io.result import load_result
from learnreg.io.transforms import read_transforms
from learnreg.spatial.sampling import resample

__all__ = ["run_apply"]


def run_apply(
    args: list[Path],
    output: Path,
    inverse: bool,
    labels: bool,
    points_space: str,
    transforms: list[str] | None = None,
    reference: Path | None = None,
    overwrite: bool = False,
) -> None:
    """Without ``transforms``: ``args`` is a result folder, then the inputs. With them
    (``-t``, antsApplyTransforms order, ``[file,1]`` for an inverse): every arg is an input,
    images go onto ``reference``'s grid, points are mapped by the list as
    antsApplyTransformsToPoints maps them."""
    if points_space.upper() not in ("RAS", "LPS"):
        raise InputError(f"--points-space must be RAS or LPS, got {points_space!r}")
    space = points_space.upper()
    if transforms:
        if inverse:
            raise InputError("--inverse applies to a result folder; with -t, write [FILE,1]")
        chain = read_transforms([parse_transform_argument(t) for t in transforms])
        ref = read_image(reference).grid if reference is not None else None
        inputs, ndim = args, chain.ndim
    else:
        if reference is not None:
            raise InputError("--reference goes with -t/--transform; a result folder has its grids")
        if len(args) < 2:
            raise InputError("give a result folder and at least one input (or -t FILE ...)")
        result = load_result(args[0])
        inputs, ndim = args[1:], result.ndim
    _check_distinct_names(inputs)
    with output_folder(output, overwrite, "apply") as stage:
        for path in inputs:
            name = Path(path).name
            if name.lower().endswith(".csv"):
                pts, extra = read_point_table(path, space=space)
                if pts.shape[1] != ndim:
                    raise InputError(f"{path}: {pts.shape[1]}D points for a {ndim}D registration")
                if transforms:
                    mapped = chain(pts.float().unsqueeze(0))[0]
                else:  # moving-space points reach fixed space through the inverse map
                    mapped = result.map_points(pts, inverse=not inverse)
                write_points(stage / name, mapped, space=space, extra=extra)
                continue
            image = read_labels(path) if labels else read_image(path)
            if image.ndim != ndim:
                raise InputError(f"{path}: {image.ndim}D input for a {ndim}D registration")
            mode = "label" if labels else "linear"
            if transforms:
                if ref is None:
                    raise InputError(f"{path}: images need --reference (the output grid) with -t")
                out = resample(image, ref, chain, mode)
            else:
                out = result.warp_inverse(image, mode) if inverse else result.warp(image, mode)
            write_image(out, stage / name)
    print(f"wrote {len(inputs)} file(s) to {output}/")


def _check_distinct_names(inputs: list[Path]) -> None:
    """Each input is written under its own file name: two with one name would collide."""
    seen: dict[str, Path] = {}
    for path in inputs:
        name = Path(path).name
        if name in seen:
            raise InputError(
                f"{path} and {seen[name]} would both be written as {name}: give inputs with "
                "distinct file names (one apply per folder, or rename one)"
            )
        seen[name] = Path(path)
