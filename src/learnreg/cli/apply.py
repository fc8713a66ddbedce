"""``learnreg apply``: warp images, label maps and point sets with a saved result."""

from __future__ import annotations

from pathlib import Path

from learnreg.core.errors import InputError
from learnreg.io.images import read_image, read_labels, write_image
from learnreg.io.points import read_point_table, write_points
from learnreg.io.result import load_result, staged_output

__all__ = ["run_apply"]


def run_apply(
    result_dir: Path,
    inputs: list[Path],
    output: Path,
    inverse: bool,
    labels: bool,
    points_space: str,
) -> None:
    if points_space.upper() not in ("RAS", "LPS"):
        raise InputError(f"--points-space must be RAS or LPS, got {points_space!r}")
    result = load_result(result_dir)
    with staged_output(output) as stage:
        for path in inputs:
            name = Path(path).name
            if name.lower().endswith(".csv"):
                pts, extra = read_point_table(path, space=points_space.upper())
                if pts.shape[1] != result.ndim:
                    raise InputError(
                        f"{path}: {pts.shape[1]}D points for a {result.ndim}D registration"
                    )
                # moving-space points reach fixed space through the inverse map, and vice versa
                mapped = result.map_points(pts, inverse=not inverse)
                write_points(stage / name, mapped, space=points_space.upper(), extra=extra)
                continue
            image = read_labels(path) if labels else read_image(path)
            if image.ndim != result.ndim:
                raise InputError(f"{path}: {image.ndim}D input for a {result.ndim}D registration")
            mode = "label" if labels else "linear"
            out = result.warp_inverse(image, mode) if inverse else result.warp(image, mode)
            write_image(out, stage / name)
    print(f"wrote {len(inputs)} file(s) to {output}/")
