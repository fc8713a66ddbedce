"""``learnreg register``: register a pair with a pretrained network or classically, and write
files any ITK tool replays.

:func:`register_into` registers one pair into its own output folder (staged beside it and
swapped in whole when it succeeds); ``learnreg register`` runs it once, and every pair of
``learnreg register-batch`` runs it on a worker."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from learnreg.api.registration import plan_registration
from learnreg.cli.progress import progress_display
from learnreg.cli.runtime import configure, logging_into, parse_transform_argument
from learnreg.core.errors import InputError
from learnreg.core.options import check_option
from learnreg.core.run_folder import output_folder
from learnreg.io.result import FORMATS, WARP_GRIDS

log = logging.getLogger(__name__)

__all__ = ["RegisterOptions", "register_into", "run_register"]


@dataclass(frozen=True)
class RegisterOptions:
    """What ``learnreg register`` is asked besides the pair's images and label maps (in a
    batch, the options every pair shares)."""

    preset: str = "default"
    config: Path | None = None
    method: str = "auto"
    model: Path | None = None
    refine: int = 0
    initial: str | None = None
    init: str | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    formats: tuple[str, ...] = ("ants",)
    seed: int = 0
    qc: bool = False
    jacobian: bool = False
    warp_grid: str = "native"
    device: str = "cpu"

    def checked(self) -> RegisterOptions:
        """These options with the output formats normalized, or :class:`InputError` naming
        the bad one."""
        if self.refine < 0:
            raise InputError(f"--refine must be >= 0, got {self.refine}")
        fmts = tuple(check_option("--output-format", f, FORMATS, InputError) for f in self.formats)
        check_option("--warp-grid", self.warp_grid, WARP_GRIDS, InputError)
        return dataclasses.replace(self, formats=fmts)

    def to_dict(self) -> dict:
        """JSON-ready (paths as strings)."""
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def register_into(
    output: Path,
    fixed: Path,
    moving: Path,
    options: RegisterOptions,
    *,
    fixed_labels: Path | None = None,
    moving_labels: Path | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    verbose: int = 0,
    stage_files: Mapping[str, dict] | None = None,
) -> str:
    """Register ``moving`` to ``fixed`` and write the result folder ``output`` whole or not
    at all; ``stage_files`` (name → JSON object) are written into it too, before its
    completion marker. Returns the line saying which path ran and why."""
    options = options.checked()
    configure(threads, options.seed)
    t0 = time.perf_counter()
    plan = plan_registration(
        fixed,
        moving,
        options.model if options.model is not None else options.method,
        preset=options.preset,
        config=options.config,
        refine=options.refine,
        initial=None if options.initial is None else parse_transform_argument(options.initial),
        init=options.init,
        fixed_mask=options.fixed_mask,
        moving_mask=options.moving_mask,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        device=options.device,
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
        reg.write(
            stage,
            qc=options.qc,
            formats=options.formats,
            jacobian=options.jacobian,
            warp_grid=options.warp_grid,
        )
        for name, obj in (stage_files or {}).items():
            (stage / name).write_text(json.dumps(obj, indent=2), encoding="utf-8")
        log.info("wrote %s", ", ".join(sorted(p.name for p in stage.iterdir())))
    return plan.why


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
    options = RegisterOptions(
        preset=preset_name,
        config=config_path,
        method=method,
        model=model_path,
        refine=refine,
        initial=initial,
        init=init,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        formats=tuple(formats or ()),
        seed=seed,
        qc=qc,
        jacobian=jacobian,
        warp_grid=warp_grid,
        device=device,
    )
    register_into(
        output,
        fixed_path,
        moving_path,
        options,
        fixed_labels=fixed_labels_path,
        moving_labels=moving_labels_path,
        threads=threads,
        overwrite=overwrite,
        quiet=quiet,
        verbose=verbose,
    )
    if not quiet:
        extra = "".join(x for x, asked in ((", jacobian", jacobian), (", qc.png", qc)) if asked)
        print(f"wrote {output}/ (warped.nii.gz, transforms{extra}, metrics.json)")
