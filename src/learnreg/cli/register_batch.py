"""``learnreg register-batch PAIRS.csv -o OUT``: register many pairs in parallel on a
``dask.distributed`` cluster (local by default, or ``--scheduler tcp://HOST:PORT``).

Every pair is one :func:`learnreg.cli.register.register_into` call on a worker — the code
of ``learnreg register`` — into ``OUT/<id>/``, written whole or not at all: staged beside
it, its completion marker written last, swapped into place. A pair is done when its folder
holds the marker and a ``batch.json`` whose key (learnreg version, options, every input
file's size and modification time) matches this run's; a rerun skips done pairs and
registers the others (a killed run's staging folders are removed then). A failing pair is
reported in ``OUT/failures.csv`` and ``OUT/summary.json`` and never stops the others; the
exit code is 1 when any failed. The CSV (columns ``fixed, moving[, fixed_labels,
moving_labels][, id]``, paths relative to it) is checked whole before any work starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from learnreg.cli.register import RegisterOptions, register_into
from learnreg.cli.runtime import parse_transform_argument
from learnreg.core.device import check_device_name, resolve_device
from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write
from learnreg.core.run_folder import MARKER
from learnreg.data.datasets import Pair, pairs_from_csv
from learnreg.io.result import write_json
from learnreg.runner.evaluate import _progress  # the bar `evaluate` shows, over pairs
from learnreg.runner.methods import file_signature

__all__ = ["BatchJob", "BatchSummary", "job_key", "is_done", "run_job", "run_register_batch"]

KEY_FILE = "batch.json"
"""Written into each pair's folder (before its completion marker): what the pair was run with."""
BATCH_MARKER = ".learnreg-batch.json"
"""Marks ``OUT`` as a register-batch folder."""
SUMMARY, FAILURES = "summary.json", "failures.csv"


@dataclass(frozen=True)
class BatchJob:
    """One pair of a batch, as it travels to a worker."""

    pair: Pair
    output: Path
    options: RegisterOptions
    threads: int | None
    key: dict = field(compare=False)


def job_key(pair: Pair, options: RegisterOptions) -> dict:
    """What a pair's result depends on: learnreg's version, the options, and the size and
    modification time of every file the pair reads (images, label maps, masks, config,
    model, initial transform)."""
    from learnreg import __version__

    files = {k: v for k, v in pair.to_dict().items() if v and k in _ROLES}
    opts = options.to_dict()
    for k in ("config", "model", "fixed_mask", "moving_mask"):
        if opts.get(k):
            files[k] = opts[k]
    if options.initial:
        initial = parse_transform_argument(options.initial)
        files["initial"] = initial[0] if isinstance(initial, tuple) else initial
    signed = {k: [v, file_signature(v)] for k, v in sorted(files.items())}
    return json.loads(json.dumps({"learnreg": __version__, "options": opts, "inputs": signed}))


_ROLES = ("fixed", "moving", "fixed_labels", "moving_labels")


def is_done(folder: Path, key: dict) -> bool:
    """Whether ``folder`` holds a finished result (completion marker) made under ``key``."""
    if not (folder / MARKER).is_file():
        return False
    try:
        return json.loads((folder / KEY_FILE).read_text(encoding="utf-8")).get("key") == key
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def run_job(job: BatchJob) -> dict:
    """Register one pair into its folder (on a worker); never raises for a failing pair:
    the record's ``error`` says what went wrong."""
    t0 = time.perf_counter()
    rec = {"id": job.pair.name, "fixed": str(job.pair.fixed), "moving": str(job.pair.moving)}
    rec.update(status="ok", error=None, why=None, host=os.uname().nodename, pid=os.getpid())
    threads = job.threads if job.threads is not None else _threads_on_this_worker()
    try:
        rec["why"] = register_into(
            job.output,
            job.pair.fixed,
            job.pair.moving,
            job.options,
            fixed_labels=job.pair.fixed_labels,
            moving_labels=job.pair.moving_labels,
            threads=threads,
            overwrite=True,  # an earlier result under another key, or a killed run's
            stage_files={KEY_FILE: {"key": job.key, "id": job.pair.name}},
        )
    except InputError as e:
        rec.update(status="failed", error=" ".join(str(e).split()))
    except Exception as e:  # a failing registration must not lose the other pairs
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        rec.update(status="failed", error=f"{type(e).__name__}: {e}{where}")
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _threads_on_this_worker() -> int:
    """Torch threads for a job on a worker of an existing cluster: the machine's cores
    shared among the jobs the worker runs at once."""
    from learnreg.runner.cluster import available_cores

    try:
        from distributed import get_worker

        concurrent = int(getattr(get_worker(), "nthreads", 1)) or 1
    except (ImportError, ValueError):
        concurrent = 1
    return max(1, available_cores() // concurrent)


@dataclass
class BatchSummary:
    """What a batch did: records of the pairs run now, ids of those done earlier."""

    output: Path
    records: list[dict]
    skipped: list[str]
    seconds: float
    cluster: dict

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def pairs_per_minute(self) -> float:
        return 60.0 * len(self.records) / self.seconds if self.seconds > 0 else float("nan")


def _check_output(out: Path) -> None:
    """``out`` is a new or empty folder, or an earlier batch's; never a user's folder."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / BATCH_MARKER).is_file():
        raise InputError(
            f"{out}: folder is not empty and not a register-batch output folder; choose "
            "another (a rerun into a batch's folder resumes it)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    if not (out / BATCH_MARKER).is_file():
        write_json(out / BATCH_MARKER, {"command": "register-batch"})


def _check_options(options: RegisterOptions, local: bool) -> RegisterOptions:
    options = options.checked()
    for what, p in (("--config", options.config), ("--model", options.model)):
        if p is not None and not Path(p).exists():
            raise InputError(f"{what} {p}: not found")
    for what, p in (("--fixed-mask", options.fixed_mask), ("--moving-mask", options.moving_mask)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{what} {p}: file not found")
    # absolute paths: workers may run in another folder
    absolute = {
        k: Path(os.path.abspath(v))
        for k in ("config", "model", "fixed_mask", "moving_mask")
        if (v := getattr(options, k)) is not None
    }
    if options.initial is not None:
        initial = parse_transform_argument(options.initial)
        if isinstance(initial, tuple):
            absolute["initial"] = f"[{os.path.abspath(initial[0])},{int(initial[1])}]"
        else:
            absolute["initial"] = os.path.abspath(initial)
    options = dataclasses.replace(options, **absolute)
    check_device_name(options.device, "--device")
    if local:  # the workers are this machine: a GPU that is absent here is absent there
        resolve_device(options.device)
    return options


def _absolute(pair: Pair) -> Pair:
    d = pair.to_dict()
    return Pair.from_dict(
        {k: (v if k == "name" or v is None else os.path.abspath(v)) for k, v in d.items()}
    )


def plan_batch(
    pairs_csv: Path,
    output: Path,
    options: RegisterOptions,
    threads: int | None,
    resume: bool = True,
    local: bool = True,
) -> tuple[list[BatchJob], list[str]]:
    """The jobs to run and the ids of pairs already done; every check happens here, before
    any work (a bad CSV, a missing file, a bad option: one :class:`InputError`)."""
    # absolute paths: a worker may run in another folder, or on another machine that shares
    # the file system
    pairs = [_absolute(p) for p in pairs_from_csv(pairs_csv, must_exist=True)]
    options = _check_options(options, local)
    out = Path(output).absolute()
    _check_output(out)
    todo, skipped = [], []
    for pair in pairs:
        key = job_key(pair, options)
        folder = out / pair.name
        if resume and is_done(folder, key):
            skipped.append(pair.name)
        else:
            todo.append(BatchJob(pair, folder, options, threads, key))
    return todo, skipped


def run_register_batch(
    pairs_csv: Path,
    output: Path,
    options: RegisterOptions,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    resume: bool = True,
    quiet: bool = False,
) -> BatchSummary:
    """Plan, run the pairs not done yet on the cluster, write ``summary.json`` (and
    ``failures.csv`` when a pair failed) into ``output``; returns the summary."""
    from learnreg.runner.cluster import local_layout, run_jobs

    local = scheduler is None
    if local:
        local_layout(1, workers, threads)  # checks both before reading anything
    elif workers is not None:
        raise InputError(
            "--workers sizes a local cluster; with --scheduler the cluster has its own"
        )
    todo, skipped = plan_batch(pairs_csv, output, options, threads, resume, local)
    output = Path(output).absolute()
    n_workers, n_threads = local_layout(len(todo), workers, threads) if local else (0, threads)
    todo = [BatchJob(j.pair, j.output, j.options, n_threads, j.key) for j in todo]
    if skipped and not quiet:
        print(
            f"register-batch: {len(skipped)} of {len(todo) + len(skipped)} pairs done earlier, skipped"
        )
    records: list[dict] = []
    cluster: dict = {"scheduler": scheduler or "local", "threads": n_threads}
    t0 = time.perf_counter()
    with _progress(not quiet, len(todo)) as bar:

        def started(info) -> None:
            cluster.update(workers=info.workers, dask_threads_per_worker=info.threads_per_worker)
            bar(f"{info.workers} workers", 0)

        def done(i: int, rec: dict | None, error: BaseException | None) -> None:
            if rec is None:  # the worker died, or the job could not run there
                job = todo[i]
                rec = {"id": job.pair.name, "fixed": str(job.pair.fixed)}
                rec.update(moving=str(job.pair.moving), status="failed", why=None)
                rec["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            records.append(rec)
            bar(f"{'failed' if rec['error'] else 'done'} {rec['id']}", 1)

        try:
            run_jobs(
                run_job,
                todo,
                scheduler=scheduler,
                workers=n_workers,
                names=[j.pair.name for j in todo],
                started=started,
                done=done,
            )
        except BaseException as e:
            if not isinstance(e, Exception):  # Ctrl-C, SIGTERM: what finished is kept
                print(
                    f"register-batch: stopped; the {len(records)} pairs finished are kept in "
                    f"{output}, a rerun registers the rest",
                    file=sys.stderr,
                )
            raise
        finally:
            summary = BatchSummary(output, records, skipped, time.perf_counter() - t0, cluster)
            _write_summary(summary)
    return summary


def _write_summary(s: BatchSummary) -> None:
    ok = [r for r in s.records if r["status"] == "ok"]
    write_json(
        s.output / SUMMARY,
        {
            "registered": len(ok),
            "failed": len(s.failed),
            "skipped": len(s.skipped),
            "seconds": s.seconds,
            "pairs_per_minute": s.pairs_per_minute,
            "cluster": s.cluster,
            "records": sorted(s.records, key=lambda r: r["id"]),
            "skipped_ids": s.skipped,
        },
    )
    path = s.output / FAILURES
    if not s.failed:
        path.unlink(missing_ok=True)  # an earlier run's, now stale
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["id", "fixed", "moving", "error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(s.failed, key=lambda r: r["id"]))
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def report_batch(s: BatchSummary) -> None:
    """One line of totals, one per failed pair, on stdout."""
    ok = len(s.records) - len(s.failed)
    c = s.cluster
    where = (
        f"{c.get('workers', 0)} workers × {c.get('threads') or 'auto'} threads"
        if c.get("workers")
        else "no workers started"
    )
    rate = f", {s.pairs_per_minute:.1f} pairs/min" if s.records else ""
    print(
        f"register-batch: {ok} registered, {len(s.failed)} failed, {len(s.skipped)} done "
        f"earlier in {s.seconds:.1f} s{rate} ({where}, scheduler {c['scheduler']}); "
        f"{s.output / SUMMARY}"
    )
    for r in sorted(s.failed, key=lambda r: r["id"]):
        print(f"failed {r['id']}: {r['error']}")
    if s.failed:
        print(f"failures: {s.output / FAILURES}")
