"""The ``learnreg`` command line: register, apply, demo, evaluate, benchmark, methods, train."""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from learnreg.cli.runtime import logging_into
from learnreg.core.errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Learn and optimize spatial transformations between images, in physical space.",
)
err = Console(stderr=True)


def _usage_error_type() -> type[Exception]:
    """Click's ``ClickException`` as typer runs it: typer ≥ 0.2x vendors its own copy of click
    (``click`` may not even be installed), older releases use ``click``; both are reached
    through typer's public ``BadParameter``."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return cls
    return typer.BadParameter  # pragma: no cover - a typer without click's hierarchy


def _one_line(message: str) -> str:
    return " ".join(message.split())


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (staging folders and temporary files are removed on
    the way out) and exit ``128 + signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the duration of a command
    (even where the parent ignored SIGINT, as shells do for background jobs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors and bad input give one error line and exit code 2;
    SIGINT / SIGTERM one line and 130 / 143, with no partial outputs left behind."""
    try:
        _main(argv)
    finally:
        # Everything is written: spare the interpreter's shutdown the collection of torch's
        # objects (0.1-0.6 s of a 4-5 s `register` on 2 cores); exit handlers still run.
        gc.freeze()


def _main(argv: list[str] | None) -> None:
    try:
        with _signals_interrupt(), logging_into(None, 0):
            code = app(args=argv, prog_name="learnreg", standalone_mode=False)
    except InputError as e:
        _error(str(e))
        sys.exit(2)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        _error(f"interrupted by {name}; nothing of this run was written")
        sys.exit(128 + e.signum)
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted; nothing of this run was written")
        sys.exit(128 + signal.SIGINT)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # a disk that fills up, a folder that vanishes, ...
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        sys.exit(1)
    except Exception as e:
        if not isinstance(e, _usage_error_type()):
            raise
        message = _one_line(e.format_message())
        if not message:  # `learnreg` alone: click printed the help, nothing else to say
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
        _error(f"{message}{hint}")
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    """One ``error:`` line; user text (file names) is never read as rich markup."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from learnreg import __version__

        print(f"learnreg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Learn and optimize spatial transformations between images, in physical space."""


# options that `register` and `register-batch` share
Preset = Annotated[
    str, typer.Option(help="Classical preset: default, multimodal, lddmm, affine, rigid.")
]
Config = Annotated[
    Path | None, typer.Option(help="YAML file of a ClassicalConfig (overrides --preset).")
]
FixedMask = Annotated[
    Path | None,
    typer.Option(
        help="Mask of the fixed image: the metric counts only voxels inside (as ANTs -x)."
    ),
]
MovingMask = Annotated[
    Path | None, typer.Option(help="Mask of the moving image (carried along with it).")
]
Method = Annotated[
    str,
    typer.Option(
        help="auto (a shipped pretrained model when the images suit it, else classical), "
        "classical, or a shipped model / method name (see `learnreg methods`)."
    ),
]
Model = Annotated[
    Path | None,
    typer.Option(help="A trained model: checkpoint of `learnreg train` or model folder."),
]
Refine = Annotated[
    int, typer.Option(help="Instance-optimization steps that start from the network's prediction.")
]
InitialTransform = Annotated[
    str | None,
    typer.Option(
        help="Starting affine: an ITK/ANTs .mat/.txt/.h5 file (fixed → moving), or "
        "[FILE,1] for its inverse, as antsRegistration's -r."
    ),
]
Init = Annotated[
    str | None,
    typer.Option(
        help="Start: com (centres of mass) or search (also a coarse grid of rotations, as "
        "antsAI: for headers wrong by a large rotation). Default: the preset's (com)."
    ),
]
OutputFormat = Annotated[
    list[str],
    typer.Option(
        help="Transform files to write: ants (affine.mat + warp.nii.gz, always written), "
        "h5 (ITK composite transform.h5 + inverse_transform.h5), fsl (FLIRT "
        "affine_flirt.mat) and lta (FreeSurfer affine.lta; both the affine part only, "
        "3D, need nitransforms). Repeatable."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of every random generator used.")]
Device = Annotated[
    str,
    typer.Option(
        help="Where a network runs: cpu, cuda, cuda:N or auto (a GPU if there is one). "
        "Classical optimization runs on the CPU."
    ),
]
Qc = Annotated[bool, typer.Option("--qc/--no-qc", help="Draw qc.png (about 5 s for a 1 mm brain).")]
Jacobian = Annotated[
    bool,
    typer.Option(
        "--jacobian",
        help="Write the Jacobian determinant map (its statistics are always in metrics.json).",
    ),
]
WarpGrid = Annotated[
    str,
    typer.Option(
        help="Grid of the warp files: native (the grid the field was computed on: exact, "
        "small; ITK/ANTs interpolate it) or fixed (the fixed image's grid, as ANTs writes)."
    ),
]


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(metavar="FIXED", help="Fixed (reference) image.")],
    moving: Annotated[
        Path, typer.Argument(metavar="MOVING", help="Moving image, warped onto the fixed grid.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    preset: Preset = "default",
    config: Config = None,
    fixed_labels: Annotated[
        Path | None, typer.Option(help="Label map of the fixed image (for Dice in metrics).")
    ] = None,
    moving_labels: Annotated[
        Path | None, typer.Option(help="Label map of the moving image (warped and scored).")
    ] = None,
    fixed_mask: FixedMask = None,
    moving_mask: MovingMask = None,
    method: Method = "auto",
    model: Model = None,
    refine: Refine = 0,
    initial_transform: InitialTransform = None,
    init: Init = None,
    output_format: OutputFormat = ["ants"],  # noqa: B006 - typer reads the default, nothing mutates it
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: torch's choice).")
    ] = None,
    seed: Seed = 0,
    device: Device = "cpu",
    qc: Qc = False,
    jacobian: Jacobian = False,
    warp_grid: WarpGrid = "native",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace OUT as a whole if it holds an earlier run's files."
        ),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="Log steps (-vv: details) to stderr and OUT/learnreg.log.",
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Register MOVING to FIXED; write the warped image, ITK/ANTs transforms and metrics.

    By default a shipped pretrained network registers T1 brain MRI it suits (after affine
    alignment); other images are registered classically. The command says which it used.
    """
    from learnreg.cli.register import run_register

    run_register(
        fixed,
        moving,
        output,
        preset,
        config,
        fixed_labels,
        moving_labels,
        quiet,
        method=method,
        model_path=model,
        refine=refine,
        initial=initial_transform,
        init=init,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        formats=output_format,
        threads=threads,
        seed=seed,
        qc=qc,
        jacobian=jacobian,
        warp_grid=warp_grid,
        verbose=verbose,
        device=device,
        overwrite=overwrite,
    )


@app.command("register-batch")
def register_batch(
    pairs: Annotated[
        Path,
        typer.Argument(
            metavar="PAIRS.csv",
            help="CSV with columns fixed,moving[,fixed_labels,moving_labels][,id]; paths "
            "relative to the CSV; id (default <moving>_to_<fixed>) names the pair's folder.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output folder: one subfolder per pair.")
    ],
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Address of a running dask scheduler (tcp://HOST:PORT). Default: a local "
            "cluster on this machine."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Workers of the local cluster (default: one per core, at most one per pair)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of each registration (default: the cores shared out among "
            "the workers)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Skip pairs whose folder is finished, from the same inputs and options.",
        ),
    ] = True,
    preset: Preset = "default",
    config: Config = None,
    fixed_mask: FixedMask = None,
    moving_mask: MovingMask = None,
    method: Method = "auto",
    model: Model = None,
    refine: Refine = 0,
    initial_transform: InitialTransform = None,
    init: Init = None,
    output_format: OutputFormat = ["ants"],  # noqa: B006 - typer reads the default, nothing mutates it
    seed: Seed = 0,
    device: Device = "cpu",
    qc: Qc = False,
    jacobian: Jacobian = False,
    warp_grid: WarpGrid = "native",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Register every pair of PAIRS.csv in parallel (dask.distributed) into OUT/<id>/, as
    `learnreg register` would one by one.

    A rerun skips finished pairs; a failing pair is listed in OUT/failures.csv without
    stopping the others (exit code 1).
    """
    from learnreg.cli.register import RegisterOptions
    from learnreg.cli.register_batch import report_batch, run_register_batch

    options = RegisterOptions(
        preset=preset,
        config=config,
        method=method,
        model=model,
        refine=refine,
        initial=initial_transform,
        init=init,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        formats=tuple(output_format),
        seed=seed,
        qc=qc,
        jacobian=jacobian,
        warp_grid=warp_grid,
        device=device,
    )
    summary = run_register_batch(
        pairs,
        output,
        options,
        scheduler=scheduler,
        workers=workers,
        threads=threads,
        resume=resume,
        quiet=quiet,
    )
    report_batch(summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def apply(
    args: Annotated[
        list[Path],
        typer.Argument(
            metavar="RESULT INPUT...",
            help="A result folder of `learnreg register`, then images, label maps (--labels) "
            "or point CSVs (.csv); with -t, inputs only.",
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    transform: Annotated[
        list[str] | None,
        typer.Option(
            "-t",
            "--transform",
            help="Transform files made elsewhere (ANTs/ITK .mat, .txt, .h5, warp .nii.gz), in "
            "antsApplyTransforms order; [FILE,1] for an inverse. Repeatable.",
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option("-r", "--reference", help="With -t: the image whose grid images go onto."),
    ] = None,
    inverse: Annotated[
        bool,
        typer.Option(help="Map fixed-space inputs into moving space (default: moving → fixed)."),
    ] = False,
    labels: Annotated[
        bool, typer.Option(help="Inputs are label maps: label-safe (one-hot) interpolation.")
    ] = False,
    points_space: Annotated[
        str, typer.Option(help="Coordinate system of point CSVs: RAS or LPS (ANTs).")
    ] = "RAS",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: torch's choice).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace OUT as a whole if it holds an earlier run's files."
        ),
    ] = False,
) -> None:
    """Warp images, label maps and point sets with a saved result, in either direction, or
    with ANTs/ITK transform files (``-t warp -t affine -r fixed``, as antsApplyTransforms).

    Default direction brings moving-space data into fixed space; ``--inverse`` the reverse.
    """
    if not transform and len(args) < 2:
        raise typer.BadParameter(
            "a result folder and at least one input (or -t FILE ... and inputs)",
            param_hint="'RESULT INPUT...'",
        )
    from learnreg.cli.apply import run_apply
    from learnreg.cli.runtime import configure

    configure(threads)
    run_apply(args, output, inverse, labels, points_space, transform, reference, overwrite)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "learnreg-demo"
    ),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace OUT as a whole if it holds an earlier run's files."
        ),
    ] = False,
) -> None:
    """Fetch real anatomy (MNI152 from the nilearn wheel), deform it, and register it back."""
    from learnreg.cli.demo import run_demo

    run_demo(output, overwrite)


def _register_commands() -> None:
    """Commands that live in their own modules register themselves on the app."""
    from learnreg.cli import evaluate, methods, train

    for module in (evaluate, methods, train):
        module.register_command(app)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
