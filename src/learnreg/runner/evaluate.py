"""Evaluate registration methods on lists of image pairs: the same scores for every method.

Methods come from specs (:mod:`learnreg.runner.methods`: ``classical:``, ``model:``,
``transforms:``, ``ants:``), pairs from :mod:`learnreg.data.datasets` (:func:`~learnreg.data.
datasets.pairs_from_csv`, :func:`~learnreg.data.datasets.atlas_folder_pairs`) or a suite
(:mod:`learnreg.runner.suites`). Every number comes from the method's
:class:`~learnreg.spatial.result.RegistrationResult` through
:func:`learnreg.metrics.score_result`, the function ``learnreg register`` and training
validation score with too. Wall time is the registration call only (or the time a
precomputed result recorded). Peak memory (``ru_maxrss`` right after registration, image
loading included) is reported only with ``isolate=True``, where every (method, pair) runs in
its own process; within one long-lived process the number would be the maximum over
everything run before.

Records (one JSON per method and pair, ``outdir/records/<method>/<pair>.json``) follow the
schema of :func:`empty_record` and are the cache: with ``resume`` a finished pair is not run
again while its :func:`cache_key` is unchanged — the same learnreg version, the same resolved
method configuration (and files the method reads), and every input file of the pair of the
same size and modification time. A pair that fails is recorded with ``error`` set and never stops the others. The
statistics, report and figures of :mod:`learnreg.eval` turn the records into tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from learnreg.core.errors import InputError
from learnreg.data.datasets import Pair, load_pair
from learnreg.io.result import write_json
from learnreg.metrics.score import score_result
from learnreg.runner.methods import Method, file_signature, resolve_method, slug

__all__ = [
    "RECORD_KEYS",
    "cache_key",
    "empty_record",
    "evaluate_pair",
    "evaluate",
    "record_path",
]

PathLike = str | os.PathLike
RECORD_KEYS = (
    "method", "pair", "fixed", "moving",
    "dice_mean", "dice", "hd95_mean", "hd95", "tre_mean", "tre_max",
    "folding_fraction", "folding_count", "sdlogj", "ice_mean",
    "seconds", "peak_memory_mb", "error", "qc_png",
)  # fmt: skip
_SCORED = ("dice", "hd95", "tre", "jacobian", "ice", "seconds")


# ---------------------------------------------------------------------------- one pair
def empty_record(method: str, pair: Pair) -> dict:
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(method=method, pair=pair.name, fixed=str(pair.fixed), moving=str(pair.moving))
    return rec


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_pair(
    method: Method | str,
    pair: Pair,
    outdir: PathLike,
    qc: bool = True,
    *,
    measure_memory: bool = False,
) -> dict:
    """Register one pair with ``method`` and compute every score of the record schema.

    Never raises for a bad pair or a failing registration: the record's ``error`` says what
    went wrong (scores stay ``None``). ``measure_memory`` fills ``peak_memory_mb`` with this
    process's peak resident memory right after registration (meaningful in a fresh process).
    """
    method = resolve_method(method)
    rec = empty_record(method.name, pair)
    outdir = Path(outdir)
    try:
        _evaluate_into(rec, method, pair, outdir, qc, measure_memory)
    except InputError as e:
        msg, where = str(e), f"pair {pair.name}:"
        rec["error"] = msg if msg.startswith(where) else f"{where} {msg}"
    except Exception as e:  # a failing registration must not lose the other pairs
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        rec["error"] = f"pair {pair.name}: {type(e).__name__}: {e}{where}"
    if rec["error"] is not None:
        for k in RECORD_KEYS[4:-2]:
            if k not in ("seconds", "peak_memory_mb"):
                rec[k] = None
    return rec


def _evaluate_into(rec: dict, method: Method, pair: Pair, outdir: Path, qc: bool, mem: bool):
    inp = load_pair(pair)
    t0 = time.perf_counter()
    result = method.register(inp.fixed, inp.moving, pair=pair)
    seconds = time.perf_counter() - t0
    # a method may time itself more precisely (e.g. excluding its own file I/O); loading
    # precomputed transforms is not registration time: theirs is what their run recorded
    if not getattr(method, "precomputed", False):
        result.info.setdefault("seconds", seconds)
    if mem:
        rec["peak_memory_mb"] = _peak_mb()
    warped_labels = None
    if inp.fixed_labels is not None:  # warped once: for the scores and the QC figure
        warped_labels = result.warp(inp.moving_labels, mode="label")
    scores = score_result(
        result,
        fixed_labels=inp.fixed_labels,
        moving_labels=inp.moving_labels,
        fixed_points=inp.fixed_points,
        moving_points=inp.moving_points,
        metrics=_SCORED,
        warped_labels=warped_labels,
    )
    rec.update({k: v for k, v in scores.items() if k in RECORD_KEYS})
    if qc:
        from learnreg.eval.figures import qc_figure
        from learnreg.optimize.config import is_multimodal
        from learnreg.spatial.sampling import resample

        grid = inp.fixed.grid
        rel = Path("figures") / slug(method.name) / f"{pair.name}.png"
        (outdir / rel).parent.mkdir(parents=True, exist_ok=True)
        warped = result.warp(inp.moving)
        qc_figure(
            inp.fixed.data[0].numpy(),
            resample(inp.moving, grid).data[0].numpy(),
            warped.data[0].numpy(),
            outdir / rel,
            displacement=None
            if result.deformable is None
            else result.deformable.voxel_field()[0].detach().numpy(),
            labels=None
            if warped_labels is None
            else (inp.fixed_labels.data[0].numpy(), warped_labels.data[0].numpy()),
            title=_qc_title(method.name, pair, rec),
            grid=grid,
            multimodal=is_multimodal(result.info.get("config")),
        )
        rec["qc_png"] = rel.as_posix()


def _qc_title(method: str, pair: Pair, rec: dict) -> str:
    bits = [f"{method}  |  {Path(pair.moving).name} → {Path(pair.fixed).name}"]
    if rec["dice_mean"] is not None:
        bits.append(f"Dice {rec['dice_mean']:.3f}")
    if rec["hd95_mean"] is not None:
        bits.append(f"HD95 {rec['hd95_mean']:.2f} mm")
    if rec["tre_mean"] is not None:
        bits.append(f"TRE {rec['tre_mean']:.2f} mm")
    if rec["seconds"] is not None:
        bits.append(f"{rec['seconds']:.1f} s")
    return "  |  ".join(bits)


# ---------------------------------------------------------------------------- many pairs
def record_path(outdir: PathLike, method_name: str, pair: Pair) -> Path:
    return Path(outdir) / "records" / slug(method_name) / f"{pair.name}.json"


def cache_key(method: Method, pair: Pair) -> dict:
    """What the record of ``method`` on ``pair`` depends on: the learnreg version, the
    method's ``fingerprint(pair)`` (its resolved configuration; a method without one is
    keyed on its ``repr``) and the signature (:func:`file_signature`) of every input file."""
    from learnreg import __version__

    fingerprint = getattr(method, "fingerprint", None)
    files = {k: [v, file_signature(v)] for k, v in pair.to_dict().items() if k != "name" and v}
    key = {
        "learnreg": __version__,
        "method": fingerprint(pair) if fingerprint else {type(method).__qualname__: repr(method)},
        "inputs": files,
    }
    return json.loads(json.dumps(key))  # as it reads back from the record


def _load_cached(path: Path, method: str, key: dict, outdir: Path, qc: bool) -> dict | None:
    """The record cached at ``path`` if it is a finished one of ``method`` under ``key``
    (with its QC figure, when ``qc``), else None."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.pop("cache_key", None) != key:
        return None
    if rec.get("error") is not None or rec.get("method") != method:
        return None
    if not set(RECORD_KEYS) <= set(rec):
        return None
    if qc and not (rec["qc_png"] and (outdir / rec["qc_png"]).is_file()):
        return None  # a figure is wanted now, or was removed
    return rec


def _save(path: Path, rec: dict, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**rec, "cache_key": key})


def _run_isolated(
    spec: str, pair: Pair, outdir: Path, qc: bool, threads: int | None = None
) -> dict:
    """Evaluate in a fresh interpreter so that peak memory is this pair's own."""
    method_name = resolve_method(spec).name
    with tempfile.TemporaryDirectory(prefix="learnreg-eval-") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [
            sys.executable, "-m", "learnreg.runner.evaluate", "--worker",
            "--method", spec, "--method-name", method_name,
            "--pair", json.dumps(pair.to_dict()), "--outdir", str(outdir), "--record", str(out),
        ]  # fmt: skip
        if not qc:
            cmd.append("--no-qc")
        if threads is not None:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
    rec = empty_record(method_name, pair)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    how = (
        f"killed by signal {-done.returncode}"
        if done.returncode < 0
        else f"exit code {done.returncode}"
    )
    rec["error"] = f"pair {pair.name}: worker process failed ({how}): {tail[0][:300]}"
    return rec


def evaluate(
    methods: Sequence[str | Method],
    pairs: Sequence[Pair],
    outdir: PathLike,
    resume: bool = True,
    isolate: bool = False,
    progress: bool = True,
    qc: bool = True,
    report: bool = True,
    label_names: Mapping[str, str] | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    """Evaluate every method on every pair; write records, QC figures and the report.

    Args:
        methods: specs (``classical:default``, ``ants:SyN``, ``transforms:DIR``, ...) or
            :class:`Method` objects (those cannot be ``isolate``d: specs travel to the worker).
        pairs: from :func:`~learnreg.data.datasets.pairs_from_csv`,
            :func:`~learnreg.data.datasets.atlas_folder_pairs` or a suite.
        outdir: report folder; records are cached in ``outdir/records/<method>/<pair>.json``.
        resume: reuse cached records of pairs that finished without error, while their
            :func:`cache_key` (inputs, method configuration) is unchanged.
        isolate: one fresh process per (method, pair), so ``peak_memory_mb`` is its own.
        progress: rich progress bar on stderr.
        report: finish with ``learnreg.eval.report.write_report(records, outdir)``.
        label_names: structure names (label code → name) for the report's figures and tables.
        threads: torch CPU threads of each registration (default: torch's choice; on a
            cluster, the cores shared out among the workers).
        scheduler, workers: run the (method, pair) registrations in parallel on a
            ``dask.distributed`` cluster (:mod:`learnreg.runner.cluster`): the scheduler at
            this address, or, with ``workers``, a local cluster of that many processes
            (methods then go as spec strings, as with ``isolate``).

    Returns the records, method by method in the order given, pairs in order.
    """
    outdir = Path(outdir)
    if not methods:
        raise InputError("no methods to evaluate (give at least one --method)")
    if not pairs:
        raise InputError("no pairs to evaluate")
    names = [p.name for p in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"pair names must be unique; repeated: {', '.join(dup)}")
    resolved = [resolve_method(m) for m in methods]
    mnames = [m.name for m in resolved]
    if len(set(map(slug, mnames))) != len(mnames):
        raise InputError(f"method names must be distinct; got {mnames} (use LABEL=SPEC)")
    distributed = scheduler is not None or workers is not None
    if (isolate or distributed) and not all(isinstance(m, str) for m in methods):
        raise InputError("isolate=True or a cluster needs methods given as spec strings")
    if isolate and distributed:
        raise InputError("isolate runs pairs one by one in fresh processes; not with a cluster")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{outdir}: cannot create the output folder ({e.strerror})") from None

    records: list[dict] = []
    with _progress(progress, len(resolved) * len(pairs)) as step:
        if distributed:
            return _finish(
                _evaluate_on_cluster(
                    methods, resolved, pairs, outdir, resume, qc, threads, scheduler, workers, step
                ),
                outdir, report, label_names,
            )  # fmt: skip
        for spec, method in zip(methods, resolved, strict=True):
            for pair in pairs:
                path = record_path(outdir, method.name, pair)
                key = cache_key(method, pair)
                rec = _load_cached(path, method.name, key, outdir, qc) if resume else None
                if rec is None:
                    step(f"{method.name} · {pair.name}", advance=0)
                    if isolate:
                        rec = _run_isolated(spec, pair, outdir, qc, threads)
                    else:
                        rec = evaluate_pair(method, pair, outdir, qc)
                    _save(path, rec, key)
                records.append(rec)
                step(f"{method.name} · {pair.name}", advance=1)
    return _finish(records, outdir, report, label_names)


def _finish(records: list[dict], outdir: Path, report: bool, label_names) -> list[dict]:
    if report:
        from learnreg.eval.report import write_report

        write_report(records, outdir, label_names=label_names)
    return records


def _evaluate_job(job: tuple[str, dict, str, bool, int | None]) -> dict:
    """One (method spec, pair) evaluated on a cluster worker."""
    spec, pair, outdir, qc, threads = job
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    pair = Pair.from_dict(pair)
    try:
        method = resolve_method(spec)
    except InputError as e:
        rec = empty_record(spec, pair)
        rec["error"] = str(e)
        return rec
    return evaluate_pair(method, pair, outdir, qc)


def _evaluate_on_cluster(
    specs, resolved, pairs, outdir, resume, qc, threads, scheduler, workers, step
) -> list[dict]:
    """:func:`evaluate`'s loop, the registrations that are not cached run on a cluster."""
    from learnreg.runner.cluster import local_layout, run_jobs

    records: dict[tuple[int, int], dict] = {}
    todo, where = [], []
    for i, (spec, method) in enumerate(zip(specs, resolved, strict=True)):
        for j, pair in enumerate(pairs):
            key = cache_key(method, pair)
            path = record_path(outdir, method.name, pair)
            rec = _load_cached(path, method.name, key, outdir, qc) if resume else None
            if rec is not None:
                records[i, j] = rec
                step(f"{method.name} · {pair.name}", advance=1)
            else:
                where.append((i, j, path, key))
                todo.append((spec, pair.to_dict(), str(Path(outdir).absolute()), qc, threads))
    n_workers, n_threads = (0, threads)
    if scheduler is None:
        n_workers, n_threads = local_layout(max(1, len(todo)), workers, threads)
    todo = [(*job[:4], n_threads) for job in todo]

    def done(k: int, rec: dict | None, error: BaseException | None) -> None:
        i, j, path, key = where[k]
        if rec is None:  # the worker died
            rec = empty_record(resolved[i].name, pairs[j])
            rec["error"] = f"pair {pairs[j].name}: worker failed ({type(error).__name__}: {error})"
        rec["method"] = resolved[i].name  # a LABEL= name, as the sequential loop records it
        _save(path, rec, key)
        records[i, j] = rec
        step(f"{resolved[i].name} · {pairs[j].name}", advance=1)

    names = [f"{slug(resolved[i].name)}-{pairs[j].name}" for i, j, *_ in where]
    run_jobs(_evaluate_job, todo, scheduler=scheduler, workers=n_workers, names=names, done=done)
    return [records[i, j] for i in range(len(resolved)) for j in range(len(pairs))]


class _progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda desc, advance=1: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description:<40.40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.__enter__()
        task = self.bar.add_task("evaluate", total=self.total)

        def step(desc: str, advance: int = 1) -> None:
            self.bar.update(task, description=desc, advance=advance)

        return step

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------- worker
def _worker(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learnreg.runner.evaluate")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--method-name", default=None)
    p.add_argument("--pair", required=True, help="JSON of Pair.to_dict()")
    p.add_argument("--outdir", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--no-qc", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    pair = Pair.from_dict(json.loads(a.pair))
    try:
        method = resolve_method(a.method)
    except InputError as e:
        rec = empty_record(a.method_name or a.method, pair)
        rec["error"] = str(e)
    else:
        rec = evaluate_pair(method, pair, a.outdir, qc=not a.no_qc, measure_memory=True)
    write_json(Path(a.record), rec)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_worker())
