"""``learnreg register``: register a pair with a pretrained network or classically, and write
files any ITK tool replays."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from learnreg.api.registration import plan_registration
from learnreg.cli.progress import progress_display
from learnreg.cli.runtime import configure, logging_into, parse_transform_argument
from learnreg.core.errors import InputError
from learnreg.core.options import check_option
from learnreg.core.run_folder import output_folder
from learnreg.io.result import FORMATS, WARP_GRIDS

log = logging.getLogger(__name__)

__all__ = ["run_register"]


def run_register(
    fixed_path: Path,
    moving_path: Path,
    output: Path,
    preset_name: str,
    config_path: Path | None,
    fixed_labels_path: Path | None,
    moving_labels_path: Path | None,
    quiet: bool,
    method: str = "auto",
    model_path: Path | None = None,
    refine: int = 0,
    initial: str | None = None,
    init: str | None = None,
    fixed_mask: Path | None = None,
    moving_mask: Path | None = None,
    formats: list[str] | None = None,
    threads: int | None = None,
    seed: int = 0,
    qc: bool = False,
    jacobian: bool = False,
    warp_grid: str = "native",
    verbose: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
) -> None:
    if refine < 0:
        raise InputError(f"--refine must be >= 0, got {refine}")
    formats = [check_option("--output-format", f, FORMATS, InputError) for f in formats or []]
    check_option("--warp-grid", warp_grid, WARP_GRIDS, InputError)
    configure(threads, seed)
    t0 = time.perf_counter()
    plan = plan_registration(
        fixed_path,
        moving_path,
        model_path if model_path is not None else method,
        preset=preset_name,
        config=config_path,
        refine=refine,
        initial=None if initial is None else parse_transform_argument(initial),
        init=init,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        fixed_labels=fixed_labels_path,
        moving_labels=moving_labels_path,
        device=device,
    )
    planned = time.perf_counter() - t0  # reading, checking, choosing the method
    if not quiet:
        print(f"learnreg register: {plan.why}")
    with output_folder(output, overwrite, "register") as stage, logging_into(stage, verbose):
        log.info("%s", plan.why)
        log.info("fixed %s: %s", plan.fixed.name, plan.fixed.grid)
        log.info("moving %s: %s", plan.moving.name, plan.moving.grid)
        with progress_display(quiet) as progress:
            reg = plan.run(progress)
        reg.result.info["timings"] = {"read": planned, **reg.result.info.get("timings", {})}
        log.info(
            "registered in %.2f s (after %.2f s reading the inputs)", reg.info["seconds"], planned
        )
        reg.write(stage, qc=qc, formats=formats, jacobian=jacobian, warp_grid=warp_grid)
        log.info("wrote %s", ", ".join(sorted(p.name for p in stage.iterdir())))
    if not quiet:
        extra = "".join(x for x, asked in ((", jacobian", jacobian), (", qc.png", qc)) if asked)
        print(f"wrote {output}/ (warped.nii.gz, transforms{extra}, metrics.json)")
