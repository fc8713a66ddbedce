"""``learnreg train CONFIG.yaml [--set key=value ...] [--resume | --overwrite] [-o OUTDIR]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register_command", "run_training"]


def run_training(
    config_path: Path,
    overrides: list[str] | None = None,
    resume: bool = False,
    output: Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Build the method and data of a YAML config and train (the ``train`` command's body).

    The run folder is checked first (:func:`~learnreg.train.outputs.check_run_folder`):
    ``resume`` needs its ``last.pt``, a new run an empty folder or ``overwrite``.
    """
    import torch

    from learnreg.core.errors import InputError
    from learnreg.methods.registry import create_method
    from learnreg.train.config import TrainConfig
    from learnreg.train.outputs import check_run_folder
    from learnreg.train.trainer import Trainer, build_datasets

    cfg = TrainConfig.from_yaml(config_path, overrides or [])
    if output is not None:
        cfg.output = str(output)
    if device is not None:
        cfg.device = device
        cfg.validate()
    check_run_folder(cfg.output, resume, overwrite, config_path)
    if cfg.init is not None:  # a shipped model's name becomes its file
        from learnreg.zoo.models import resolve_model

        cfg.init = str(resolve_model(cfg.init)[1])
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    try:
        method = create_method(cfg.method, **cfg.method_config)
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{config_path}: method {cfg.method!r}: {e}") from None
    if not method.learned:
        raise InputError(
            f"{config_path}: method {method.name!r} has no learned weights, there is nothing "
            f"to train; register with `learnreg register FIXED MOVING --method {method.name}`"
        )
    train_set, val_set = build_datasets(cfg, method)
    try:
        trainer = Trainer(cfg, method, train_set, val_set)
    except InputError as e:  # the data do not fit the configured network
        raise InputError(f"{config_path}: {e}") from None
    return trainer.fit(resume=resume, overwrite=overwrite)


def register_command(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train")
    def train(
        config: Annotated[
            Path, typer.Argument(metavar="CONFIG", help="YAML training configuration.")
        ],
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override a config value: key.sub=value (repeatable)."),
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue from OUTDIR/checkpoints/last.pt.")
        ] = False,
        overwrite: Annotated[
            bool,
            typer.Option(
                "--overwrite", help="Remove an earlier run's files from OUTDIR, then train."
            ),
        ] = False,
        output: Annotated[
            Path | None, typer.Option("-o", "--output", help="Output folder (overrides config).")
        ] = None,
        device: Annotated[
            str | None,
            typer.Option(help="cpu, cuda, cuda:N or auto (overrides the config's device)."),
        ] = None,
    ) -> None:
        """Train a learned registration method (single process, or DDP under torchrun)."""
        from rich.console import Console

        summary = run_training(config, set_ or [], resume, output, device, overwrite)
        if summary.get("output") and _is_main():
            msg = f"trained {summary['step']} steps; outputs in {summary['output']}"
            if summary.get("best_value") is not None:
                msg += (
                    f" (best validation {summary['best_key']} {summary['best_value']:.4f} at "
                    f"step {summary['best_step']}"
                )
                if summary.get("identity_dice") is not None:
                    msg += f", identity Dice {summary['identity_dice']:.4f}"
                msg += ")"
            Console().print(msg, highlight=False, markup=False)


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
