"""Benchmark: ``learnreg register`` on 1 mm LPBA40 brains, whole command against ANTs SyN.

Every run is a fresh process with ``--threads`` threads (default 2), in one sitting:

* **atlas pairs** (fixed S01, moving each of S35–S40): the ``learnreg register`` command as a
  user runs it (process start to files written: wall time and peak memory of the process),
  its in-process registration time from ``result.json`` (reading the inputs to transforms
  ready), mean Dice over the 56 labels of the moving labels carried by the *written* files,
  label-safe (learnreg's one-hot warp, what ``learnreg apply --labels`` does; ANTs'
  ``genericLabel`` for ANTs) and nearest neighbour (both methods), and the voxels with
  det J ≤ 0 (``metrics.json``); one row
  per ``--variant`` (``auto``; ``refine=N``; ``model=NAME``; ``classical``), beside
  ``ants.registration(type_of_transform='SyN')`` timed around the call (and its process);
* **subject pairs** (the 15 pairs Si → Sj, i < j, among S35–S40): ``auto`` against
  ``--method classical`` and the subject-to-subject model (``--pair-variants``), wall time
  and Dice;
* **linear stage** (atlas pairs): the ``affine`` preset the model path runs against the
  default's rigid → affine stages, time of the call and Dice after it.

S35–S40 are LPBA40's validation subjects for the shipped models (they chose training stages;
the models never trained on them): they are not held out, and the tables say so.

    .venv/bin/python benchmarks/fast_register.py [--variants auto refine=50] [--threads 2]

Needs antspyx (``pip install antspyx``; benchmark-only). Writes
benchmarks/results/fast_register.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEARNREG_DATA", ROOT.parent / "shared" / "data")) / "lpba40"
OUT = ROOT / "benchmarks" / "results"
LEARNREG = [sys.executable, "-m", "learnreg"]
SUBJECTS = [f"S{i}" for i in range(35, 41)]


def image(s: str) -> Path:
    return DATA / f"images/{s}.nii.gz"


def labels(s: str) -> Path:
    return DATA / f"labels/{s}.nii.gz"


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak resident MB of the process, and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def dice(fixed_labels: np.ndarray, warped: np.ndarray) -> float:
    ids = [v for v in np.unique(fixed_labels) if v != 0]
    return float(
        np.mean(
            [
                2
                * np.logical_and(fixed_labels == v, warped == v).sum()
                / max(1, (fixed_labels == v).sum() + (warped == v).sum())
                for v in ids
            ]
        )
    )


def score_folder(folder: Path, fixed: str, moving: str) -> dict[str, float]:
    """Dice of the moving labels carried by the files in ``folder``: ``dice`` nearest
    neighbour, ``dice_label`` label-safe (one-hot linear + argmax)."""
    from learnreg.io.images import read_labels
    from learnreg.io.result import load_result

    result = load_result(folder)
    moving_labels, fixed_labels = read_labels(labels(moving)), read_labels(labels(fixed))
    ref = fixed_labels.data[0].numpy()
    return {
        f"dice{suffix}": dice(ref, result.warp(moving_labels, mode=mode).data[0].numpy())
        for suffix, mode in (("", "nearest"), ("_label", "label"))
    }


def variant_flags(variant: str) -> list[str]:
    """``auto``, ``classical``, ``refine=N``, ``model=NAME`` or several joined by ``+``."""
    flags: list[str] = []
    for part in variant.split("+"):
        key, _, value = part.partition("=")
        if part == "classical":
            flags += ["--method", "classical"]
        elif key == "refine":
            flags += ["--refine", value]
        elif key == "model":
            flags += ["--method", value]
        elif part != "auto":
            raise SystemExit(f"unknown variant {variant!r}")
    return flags


def run_register(fixed: str, moving: str, variant: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [*LEARNREG, "register", str(image(fixed)), str(image(moving)), "-o", str(out)]
        seconds, memory, said = timed([*cmd, *variant_flags(variant), "--threads", env["T"]], env)
        info = json.loads((out / "result.json").read_text())["info"]
        metrics = json.loads((out / "metrics.json").read_text())
        return {
            "wall_seconds": seconds,
            "registration_seconds": info["seconds"] + info.get("timings", {}).get("read", 0.0),
            "timings": info.get("timings", {}),
            "peak_memory_mb": memory,
            **score_folder(out, fixed, moving),
            "folding_count": (metrics.get("jacobian") or {}).get("folding_count", 0),
            "engine": said.splitlines()[0] if said else "",
        }


def run_ants(moving: str, env: dict) -> dict:
    """ANTs SyN through benchmarks/lpba40_register.py's worker (fixed S01), in its process."""
    script = Path(__file__).with_name("lpba40_register.py")
    seconds, memory, said = timed(
        [sys.executable, str(script), "--worker", "ants_SyN", moving], env
    )
    row = json.loads([x for x in said.splitlines() if x.startswith("RESULT ")][0][7:])
    return {
        "wall_seconds": seconds,
        "registration_seconds": row["seconds"],
        "peak_memory_mb": memory,
        "dice": row["dice"],
        "dice_label": row["dice_label"],
        "folding_count": int(round(row["folding_percent"] / 100 * 160 * 192 * 160)),
    }


def linear_worker(moving: str, preset: str) -> None:
    """One linear registration S01 ← moving in this process; prints its time and Dice."""
    import torch

    from learnreg.io.images import read_image, read_labels
    from learnreg.optimize.classical import register
    from learnreg.optimize.config import ClassicalConfig
    from learnreg.optimize.config import preset as named

    torch.set_num_threads(int(os.environ["T"]))
    fixed, mov = read_image(image("S01")), read_image(image(moving))
    config = ClassicalConfig(linear=named("default").linear, deformable=None)
    t0 = time.perf_counter()
    result = register(fixed, mov, "affine" if preset == "affine" else config)
    seconds = time.perf_counter() - t0
    warped = result.warp(read_labels(labels(moving)), mode="nearest").data[0].numpy()
    row = {"seconds": seconds, "dice": dice(read_labels(labels("S01")).data[0].numpy(), warped)}
    print("RESULT " + json.dumps(row), flush=True)


def run_linear(moving: str, preset: str, env: dict) -> dict:
    _, _, said = timed([sys.executable, __file__, "--linear-worker", moving, preset], env)
    return json.loads([x for x in said.splitlines() if x.startswith("RESULT ")][0][7:])


def summarize(rows: list[dict]) -> dict:
    keys = ("wall_seconds", "registration_seconds", "peak_memory_mb", "dice")
    out = {f"median_{k}": float(np.median([r[k] for r in rows])) for k in keys if k in rows[0]}
    for key in ("dice", "dice_label"):
        if key in rows[0]:
            out[f"mean_{key}"] = float(np.mean([r[key] for r in rows]))
    out["folding_count_max"] = int(max(r.get("folding_count", 0) for r in rows))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variants",
        nargs="+",
        default=[
            "auto",
            "refine=30",
            "model=lpba40-vxm-unsup",
            "model=lpba40-vxm-unsup+refine=30",
        ],
    )
    p.add_argument(
        "--pair-variants", nargs="+", default=["auto", "classical", "model=lpba40-vxm-pairs"]
    )
    p.add_argument("--subjects", nargs="+", default=SUBJECTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["ants", "pairs", "linear"])
    p.add_argument("--output", type=Path, default=OUT / "fast_register.json")
    p.add_argument("--linear-worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.linear_worker:
        linear_worker(*a.linear_worker)
        return
    env = dict(os.environ, T=str(a.threads))
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    results: dict = {"threads": a.threads, "atlas": {}, "pairs": {}, "linear": {}}

    def say(section: str, name: str, row: dict) -> None:
        print(json.dumps({"section": section, "method": name, **row}), flush=True)

    for variant in a.variants:
        rows = []
        for s in a.subjects:
            rows.append({"subject": s, **run_register("S01", s, variant, env)})
            say("atlas", variant, rows[-1])
        results["atlas"][variant] = {"rows": rows, **summarize(rows)}
    if "ants" not in a.skip:
        rows = [{"subject": s, **run_ants(s, env)} for s in a.subjects]
        for r in rows:
            say("atlas", "ants_SyN", r)
        results["atlas"]["ants_SyN"] = {"rows": rows, **summarize(rows)}
    if "pairs" not in a.skip:
        for variant in a.pair_variants:
            rows = []
            for f, m in combinations(a.subjects, 2):
                rows.append({"pair": f"{m}_to_{f}", **run_register(f, m, variant, env)})
                say("pairs", variant, rows[-1])
            results["pairs"][variant] = {"rows": rows, **summarize(rows)}
    if "linear" not in a.skip:
        for preset in ("affine", "default_linear"):
            rows = [{"subject": s, **run_linear(s, preset, env)} for s in a.subjects]
            for r in rows:
                say("linear", preset, r)
            results["linear"][preset] = {
                "rows": rows,
                "median_seconds": float(np.median([r["seconds"] for r in rows])),
                "mean_dice": float(np.mean([r["dice"] for r in rows])),
            }

    from learnreg.core.files import atomic_write

    a.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(a.output) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"\nwrote {a.output}")


def print_tables(results: dict) -> None:
    atlas = results["atlas"]
    syn = atlas.get("ants_SyN", {})
    print(
        f"\nAtlas pairs S01 ← S35–S40 (validation subjects, not held out), {results['threads']} threads"
    )
    print(
        "| method | mean Dice (label-safe) | mean Dice (nearest) | max #det J ≤ 0 | "
        "median command (s) | / SyN | median registration (s) | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in atlas.items():
        ratio = (
            f"{s['median_wall_seconds'] / syn['median_registration_seconds']:.3f}"
            if syn and name != "ants_SyN"
            else "–"
        )
        print(
            f"| {name} | {s['mean_dice_label']:.4f} | {s['mean_dice']:.4f} | {s['folding_count_max']} | "
            f"{s['median_wall_seconds']:.2f} | {ratio} | {s['median_registration_seconds']:.2f} | "
            f"{s['median_peak_memory_mb']:.0f} |"
        )
    if syn:
        print("/ SyN: learnreg's whole command over the time of ants.registration(...) alone")
    if results["pairs"]:
        print("\nSubject pairs Si → Sj among S35–S40 (15 pairs)")
        print(
            "| method | mean Dice (label-safe) | mean Dice (nearest) | median command (s) "
            "| time / classical |"
        )
        print("|---|---|---|---|---|")
        base = results["pairs"].get("classical", {}).get("median_wall_seconds")
        for name, s in results["pairs"].items():
            ratio = f"{s['median_wall_seconds'] / base:.2f}" if base else "–"
            print(
                f"| {name} | {s['mean_dice_label']:.4f} | {s['mean_dice']:.4f} | "
                f"{s['median_wall_seconds']:.2f} | {ratio} |"
            )
    if results["linear"]:
        print("\nLinear stage, S01 ← S35–S40")
        print("| stages | mean Dice after it | median time (s) |")
        print("|---|---|---|")
        for name, s in results["linear"].items():
            print(f"| {name} | {s['mean_dice']:.4f} | {s['median_seconds']:.3f} |")


if __name__ == "__main__":
    main()
