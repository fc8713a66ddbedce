"""``learnreg evaluate`` and ``learnreg benchmark``: score methods on pairs, write a report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from learnreg.core.errors import InputError

__all__ = ["register_command", "results_table", "run_evaluate", "run_benchmark"]


# options that evaluate and benchmark share
Resume = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Reuse finished pairs' records.")
]
Isolate = Annotated[
    bool,
    typer.Option(
        "--isolate/--no-isolate", help="One process per (method, pair): peak memory is its own."
    ),
]
LabelNames = Annotated[
    Path | None,
    typer.Option(
        help="Structure names for figures and reports: ITK-SNAP label file, FreeSurfer LUT, "
        "or CSV/TSV of code,name."
    ),
]
Threads = Annotated[
    int | None, typer.Option(help="CPU threads of each registration (default: torch's).")
]
Seed = Annotated[int, typer.Option(help="Seed of every random generator used.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Qc = Annotated[bool, typer.Option("--qc/--no-qc", help="Draw a QC figure of every pair.")]
Scheduler = Annotated[
    str | None,
    typer.Option(
        help="Run the pairs in parallel on the dask cluster of this scheduler (tcp://HOST:PORT)."
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(help="Run the pairs in parallel on a local dask cluster of N worker processes."),
]


def register_command(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``benchmark`` to a Typer app."""

    @app.command()
    def evaluate(
        method: Annotated[
            list[str],
            typer.Option(
                "--method",
                "-m",
                help="Method spec, repeatable: classical:PRESET, ants:TYPE, transforms:DIR; "
                "LABEL=SPEC names it. Two or more give a paired comparison.",
            ),
        ],
        output: Annotated[Path, typer.Option("-o", "--output", help="Report folder.")],
        pairs: Annotated[
            Path | None,
            typer.Option(
                help="CSV with columns fixed,moving[,fixed_labels,moving_labels,fixed_points,"
                "moving_points][,name]; paths relative to the CSV."
            ),
        ] = None,
        atlas: Annotated[Path | None, typer.Option(help="Fixed atlas image.")] = None,
        atlas_labels: Annotated[Path | None, typer.Option(help="Atlas label map.")] = None,
        moving_dir: Annotated[
            Path | None, typer.Option(help="Folder of moving images (with --atlas).")
        ] = None,
        labels_dir: Annotated[
            Path | None, typer.Option(help="Folder of moving label maps, same file names.")
        ] = None,
        pattern: Annotated[str, typer.Option(help="Moving image file pattern.")] = "*.nii.gz",
        resume: Resume = True,
        isolate: Isolate = False,
        label_names: LabelNames = None,
        threads: Threads = None,
        seed: Seed = 0,
        quiet: Quiet = False,
        qc: Qc = True,
        scheduler: Scheduler = None,
        workers: Workers = None,
    ) -> None:
        """Evaluate registration methods on pairs: Dice, HD95, TRE, folding, ICE, time.

        Writes per-pair records, QC figures and report.html into OUTPUT.
        """
        run_evaluate(
            method, output, pairs, atlas, atlas_labels, moving_dir, labels_dir, pattern,
            resume, isolate, quiet, label_names, threads, seed, qc, scheduler, workers,
        )  # fmt: skip

    @app.command()
    def benchmark(
        suite: Annotated[
            str, typer.Argument(metavar="SUITE", help="Suite name, e.g. lpba40-atlas.")
        ],
        output: Annotated[Path, typer.Option("-o", "--output", help="Report folder.")],
        data: Annotated[
            Path | None,
            typer.Option(help="Data root (default $LEARNREG_DATA or ../shared/data)."),
        ] = None,
        subjects: Annotated[
            list[str] | None,
            typer.Option("--subjects", "-s", help="Moving subjects, repeatable (e.g. -s S35)."),
        ] = None,
        method: Annotated[
            list[str] | None,
            typer.Option("--method", "-m", help="Method spec, repeatable (default: suite's)."),
        ] = None,
        resume: Resume = True,
        isolate: Isolate = True,
        label_names: LabelNames = None,
        threads: Threads = None,
        seed: Seed = 0,
        quiet: Quiet = False,
    ) -> None:
        """Run a named benchmark suite and write its report."""
        run_benchmark(
            suite, output, data, subjects, method, resume, isolate, quiet, label_names,
            threads, seed,
        )  # fmt: skip


def _split(values: list[str] | None) -> list[str]:
    """Allow both ``-s S35 -s S36`` and ``-s S35,S36``."""
    out: list[str] = []
    for v in values or []:
        out += [x for x in (s.strip() for s in v.split(",")) if x]
    return out


def run_evaluate(
    methods: list[str],
    output: Path,
    pairs_csv: Path | None,
    atlas: Path | None,
    atlas_labels: Path | None,
    moving_dir: Path | None,
    labels_dir: Path | None,
    pattern: str = "*.nii.gz",
    resume: bool = True,
    isolate: bool = False,
    quiet: bool = False,
    label_names: Path | None = None,
    threads: int | None = None,
    seed: int = 0,
    qc: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    from learnreg.cli.runtime import configure
    from learnreg.data.datasets import atlas_folder_pairs, pairs_from_csv
    from learnreg.io.label_names import read_label_names
    from learnreg.runner.evaluate import evaluate

    configure(threads, seed)
    names = read_label_names(label_names) if label_names is not None else None
    if pairs_csv is not None and (atlas is not None or moving_dir is not None):
        raise InputError("give either --pairs CSV or --atlas/--moving-dir, not both")
    if pairs_csv is not None:
        pairs = pairs_from_csv(pairs_csv, must_exist=True)
    elif atlas is not None and moving_dir is not None:
        pairs = atlas_folder_pairs(atlas, atlas_labels, moving_dir, labels_dir, pattern)
    elif atlas is not None or moving_dir is not None:
        raise InputError("--atlas and --moving-dir go together")
    else:
        raise InputError("no pairs: give --pairs CSV or --atlas IMG --moving-dir DIR")
    if not methods:
        raise InputError("give at least one --method (e.g. classical:default)")
    records = evaluate(
        methods, pairs, output, resume=resume, isolate=isolate, progress=not quiet, qc=qc,
        label_names=names, threads=threads, scheduler=scheduler, workers=workers,
    )  # fmt: skip
    _print_summary(records, output)
    return records


def run_benchmark(
    suite_name: str,
    output: Path,
    data: Path | None = None,
    subjects: list[str] | None = None,
    methods: list[str] | None = None,
    resume: bool = True,
    isolate: bool = True,
    quiet: bool = False,
    label_names: Path | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> list[dict]:
    from learnreg.cli.runtime import configure
    from learnreg.io.label_names import read_label_names
    from learnreg.runner.evaluate import evaluate
    from learnreg.runner.suites import get_suite

    configure(threads, seed)
    suite = get_suite(suite_name)
    names = read_label_names(label_names) if label_names is not None else suite.label_names
    pairs = suite.pairs(data, _split(subjects) or None)
    methods = list(methods or suite.default_methods())
    records = evaluate(
        methods, pairs, output, resume=resume, isolate=isolate, progress=not quiet,
        label_names=names, threads=threads,
    )  # fmt: skip
    _print_summary(records, output, title=f"{suite.name}: {suite.description}")
    return records


def _fmt(s: dict, digits: int, scale: float = 1.0, ci: bool = False) -> str:
    m = s["mean"]
    if s["n"] == 0 or m is None or not math.isfinite(m):
        return "–"
    text = f"{m * scale:.{digits}f}"
    if ci and math.isfinite(s["low"]) and math.isfinite(s["high"]):
        text += f" [{s['low'] * scale:.{digits}f}, {s['high'] * scale:.{digits}f}]"
    return text


def results_table(records: list[dict], title: str | None = None) -> Table:
    """Per method: pairs ok/failed, mean Dice [95% bootstrap CI], HD95, TRE, % folding,
    SDlogJ, time, peak memory."""
    from learnreg.eval.statistics import methods_in, summarize

    summary = summarize(records, n_resamples=2000)
    methods = methods_in(records)
    columns = [  # (header, metric, digits, scale, ci)
        ("Dice [95% CI]", "dice_mean", 3, 1.0, True),
        ("HD95 mm", "hd95_mean", 2, 1.0, False),
        ("TRE mm", "tre_mean", 2, 1.0, False),
        ("% det J≤0", "folding_fraction", 4, 100.0, False),
        ("SDlogJ", "sdlogj", 3, 1.0, False),
        ("time s", "seconds", 1, 1.0, False),
        ("memory MB", "peak_memory_mb", 0, 1.0, False),
    ]
    # leave out columns no method has a value for (no landmarks, memory not measured)
    columns = [c for c in columns if any(summary[m][c[1]]["n"] for m in methods)]
    table = Table(title=escape(title) if title else None, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("method")
    table.add_column("pairs ok", justify="right")
    for header, *_ in columns:
        table.add_column(header, justify="right")
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        failed = sum(1 for r in rows if r.get("error"))
        cells = [_fmt(summary[method][m], d, scale=sc, ci=ci) for _, m, d, sc, ci in columns]
        table.add_row(escape(str(method)), f"{len(rows) - failed}/{len(rows)}", *cells)
    return table


def _print_summary(records: list[dict], output: Path, title: str | None = None) -> None:
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not wrap the table at 80 columns
        console = Console(width=max(console.width, 140))
    console.print(results_table(records, title))
    errors = [r for r in records if r.get("error")]
    for r in errors:
        console.print(
            f"[red]failed[/] {escape(str(r['method']))} · {escape(str(r['pair']))}: "
            f"{escape(str(r['error']))}",
            highlight=False,
            soft_wrap=True,
        )
    report = Path(output) / "report.html"
    console.print(
        escape(f"report: {report if report.exists() else Path(output)}"),
        highlight=False,
        soft_wrap=True,
    )
