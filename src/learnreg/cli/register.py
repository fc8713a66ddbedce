"""``learnreg register``: register a pair with a pretrained network or classically, and write
files any ITK tool replays."""

from __future__ import annotations

from pathlib import Path

from learnreg.api.registration import plan_registration
from learnreg.cli.progress import progress_display
from learnreg.core.errors import InputError
from learnreg.io.result import staged_output

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
) -> None:
    if refine < 0:
        raise InputError(f"--refine must be >= 0, got {refine}")
    plan = plan_registration(
        fixed_path,
        moving_path,
        model_path if model_path is not None else method,
        preset=preset_name,
        config=config_path,
        refine=refine,
        fixed_labels=fixed_labels_path,
        moving_labels=moving_labels_path,
    )
    if not quiet:
        print(f"learnreg register: {plan.why}")
    with staged_output(output) as stage:
        with progress_display(quiet) as progress:
            reg = plan.run(progress)
        reg.write(stage)
    if not quiet:
        print(f"wrote {output}/ (warped.nii.gz, transforms, jacobian, qc.png, metrics.json)")
