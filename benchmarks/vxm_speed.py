"""Benchmark: learnreg's VoxelMorph against voxelmorph's ``VxmPairwise`` on CPU.

Both networks are diffeomorphic (stationary velocity, ``--steps`` scaling-and-squaring steps at
full resolution in both, default 5 = VxmPairwise's default), batch 1, one image pair of
``--size`` (default 160×192×160), float32, a fixed number of intra-op threads (``--threads``,
default 2). Measured in one run, every number in its own fresh subprocess:

* inference: wall time of one forward pass returning the displacement and the warped moving
  image, without gradients, in eval mode (VxmPairwise: ``model(moving, fixed,
  return_warped_source=True)`` under ``torch.no_grad``; learnreg: ``VoxelMorph.predict``);
  median of ``--repeats`` runs after ``--warmup`` runs;
* training step: forward + loss + backward + Adam step (+ zero_grad), median likewise. Each
  package's own loss of the same kind: local NCC (window 9) of the warped moving vs the
  fixed image + 1.0 × mean squared forward differences of the predicted velocity
  (VxmPairwise: ``1 - neurite.nn.modules.NCC(9)`` + ``SpatialGradient("l2")``; learnreg:
  ``VoxelMorph.loss`` = ``lncc`` + ``diffusion``);
* peak memory of one inference and of one training step: peak resident set size during the
  call minus the resident set size just before it, in a fresh process after the model, the
  inputs and the optimizer were created (``VmHWM`` of ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` right before the call; the first call of the process, so any
  one-time buffers count too).

Network features (the comparison is VxmPairwise's **defaults**, ``nb_features=(16,)*5``):

* VxmPairwise's BasicUNet: 5 encoder convs (16 features) at 1, 1/2, ..., 1/16 resolution,
  each followed by 2× max pooling; a bottleneck conv (16) at 1/32; 5 decoder levels of
  trilinear 2× upsampling + skip concatenation + conv (16), the last at full resolution;
  a 1×1 conv to 3 channels and the 3×3×3 flow conv (3 → 3); ReLU.
* learnreg's UNet with ``enc_features=(16,)*5, dec_features=(16,)*6``: 5 encoder convs (16)
  of stride 2 (outputs at 1/2 ... 1/32: VoxelMorph's original design, which replaces
  "conv then pool"); 6 decoder convs (16), the first at 1/32 (VxmPairwise's bottleneck), each
  of the next four after nearest 2× upsampling + skip concatenation at 1/16 ... 1/2 and the
  last at full resolution after concatenating the input pair; the 3×3×3 flow head (16 → 3);
  LeakyReLU(0.2).

Same number of convs and features (11 + head; 105k vs 100k parameters); the architectures
differ in where the encoder convs run (before pooling vs strided), in upsampling (linear vs
nearest) and in the head, so the multiply-accumulates differ: the table prints both (conv
GMAC per forward pass). ``--int-downsize 2`` adds a learnreg row that predicts and integrates
the velocity at half resolution (VoxelMorph-diff's design): less work, labelled as such, and
not used for the ratios.

    python benchmarks/vxm_speed.py [--size 160 192 160] [--threads 2] [--repeats 5]

Needs voxelmorph (``pip install voxelmorph``, benchmark-only). Writes
benchmarks/results/vxm_speed.json and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vxm_speed.json"
FEATURES = 16
LEVELS = 5
WINDOW = 9
REG_WEIGHT = 1.0


# ---------------------------------------------------------------------------- worker side
def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def _images(shape: tuple[int, ...]):
    """A reproducible pair of smooth random images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 1, *[max(2, s // 8) for s in shape], generator=g)
    img = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    img = (img - img.amin()) / (img.amax() - img.amin())
    return img[:1].contiguous(), img[1:].contiguous()


def _conv_gmac(model, run) -> float:
    """Multiply-accumulates of all convolutions in one forward pass (GMAC)."""
    import torch

    total = [0]

    def hook(mod, inputs, output):
        k = 1
        for s in mod.kernel_size:
            k *= s
        total[0] += output.numel() * (mod.in_channels // mod.groups) * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def _build(package: str, steps: int, int_downsize: int, fixed, moving):
    """Model and the two callables ``infer()`` and ``loss()`` for one package."""
    import torch

    torch.manual_seed(0)
    if package == "voxelmorph":
        import neurite as ne
        import voxelmorph as vxm

        model = vxm.nn.models.VxmPairwise(
            ndim=3,
            source_channels=1,
            target_channels=1,
            nb_features=(FEATURES,) * LEVELS,
            integration_steps=steps,
        )
        ncc = ne.nn.modules.NCC(window_size=WINDOW)
        grad = ne.nn.modules.SpatialGradient(penalty="l2")

        def infer():
            model.eval()
            with torch.no_grad():
                return model(moving, fixed, return_warped_source=True)

        def loss():
            velocity, warped = model(
                moving, fixed, return_warped_source=True, return_field_type="velocity"
            )
            return (1.0 - ncc(warped, fixed).mean()) + REG_WEIGHT * grad(velocity)

        def forward():
            return model(moving, fixed, return_warped_source=True)

    else:
        from learnreg.methods.base import RegistrationBatch
        from learnreg.methods.registry import create_method

        model = create_method(
            "voxelmorph",
            ndim=3,
            enc_features=(FEATURES,) * LEVELS,
            dec_features=(FEATURES,) * (LEVELS + 1),
            similarity="lncc",
            window=WINDOW,
            reg_weight=REG_WEIGHT,
            integration_steps=steps,
            int_downsize=int_downsize,
        )
        batch = RegistrationBatch(fixed, moving)

        def infer():
            return model.predict(fixed, moving)

        def loss():
            return model.loss(batch, model(fixed, moving))["total"]

        def forward():
            return model(fixed, moving)

    return model, infer, loss, forward


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    shape = tuple(args.size)
    fixed, moving = _images(shape)
    model, infer, loss, forward = _build(args.package, args.steps, args.int_downsize, fixed, moving)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return value

    call = infer if args.kind == "inference" else train_step
    result: dict = {"package": args.package, "kind": args.kind, "metric": args.metric}
    if args.metric == "memory":
        gc.collect()
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        call()
        peak = _status_kb("VmHWM")
        result["peak_mb"] = (peak - before) / 1024
        result["rss_before_mb"] = before / 1024
        return result
    for _ in range(args.warmup):
        call()
    walls, cpus = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    result["all_seconds"] = walls if args.clock == "wall" else cpus
    result["all_cpu_seconds"] = cpus
    result["seconds"] = statistics.median(result["all_seconds"])
    if args.kind == "inference":
        result["conv_gmac"] = _conv_gmac(model, forward)
        result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


# ---------------------------------------------------------------------------- parent side
def run_worker(args: argparse.Namespace, package: str, kind: str, metric: str, **over) -> dict:
    repeats = args.repeats if kind == "inference" else args.train_repeats
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--package",
        package,
        "--kind",
        kind,
        "--metric",
        metric,
        "--size",
        *map(str, args.size),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--int-downsize",
        str(over.get("int_downsize", 1)),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(repeats),
        "--clock",
        args.clock,
    ]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {package}/{kind}/{metric} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[160, 192, 160], metavar=("D", "H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="scaling-and-squaring steps (both)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed inference runs")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training steps")
    p.add_argument(
        "--int-downsize",
        type=int,
        default=1,
        help="if > 1, also time learnreg with the velocity at 1/N resolution (extra row)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time.perf_counter (default) or process CPU time (for a busy machine, 1 thread)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timing processes per package, alternating packages (median over all runs)",
    )
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=("inference", "training"),
        default=["inference", "training"],
        help="what to measure (default both)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--package", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--metric", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if any(s % 2**LEVELS for s in args.size):
        p.error(f"every size must be divisible by {2**LEVELS} (5 pooling levels)")

    rows: dict[str, dict] = {"voxelmorph": {}, "learnreg": {}}
    extra = f"learnreg int_downsize={args.int_downsize}"
    if args.int_downsize > 1:
        rows[extra] = {}
    t_start = time.time()
    for kind in args.kinds:
        for metric in ("time",) if args.skip_memory else ("time", "memory"):
            # timing: `rounds` fresh processes per package, alternating packages, so that a
            # change of machine load affects both; the median is over all timed runs
            for _ in range(args.rounds if metric == "time" else 1):
                for package in rows:
                    pkg = "voxelmorph" if package == "voxelmorph" else "learnreg"
                    ids = args.int_downsize if package == extra else 1
                    r = run_worker(args, pkg, kind, metric, int_downsize=ids)
                    print(f"  {package:<28} {kind:<9} {metric:<6} {json.dumps(r)}", file=sys.stderr)
                    row = rows[package]
                    for k, v in r.items():
                        if k.startswith("all_"):
                            row.setdefault(f"{kind}_{k}", []).extend(v)
                        elif k not in ("package", "kind", "metric", "seconds"):
                            row[f"{kind}_{k}"] = v
            if metric == "time":
                for row in rows.values():
                    row[f"{kind}_seconds"] = statistics.median(row[f"{kind}_all_seconds"])
    ratios = {
        key: rows["learnreg"][key] / rows["voxelmorph"][key]
        for key in (
            "inference_seconds",
            "training_seconds",
            "inference_peak_mb",
            "training_peak_mb",
        )
        if key in rows["voxelmorph"]
    }
    import torch
    import voxelmorph

    result = {
        "size": args.size,
        "threads": args.threads,
        "clock": args.clock,
        "integration_steps": args.steps,
        "warmup": args.warmup,
        "repeats": {"inference": args.repeats, "training": args.train_repeats},
        "rounds": args.rounds,
        "versions": {
            "torch": torch.__version__,
            "voxelmorph": getattr(voxelmorph, "__version__", "?"),
            "python": platform.python_version(),
        },
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
        "ratios_learnreg_over_voxelmorph": ratios,
        "targets": {
            "inference_seconds": 0.5,
            "training_seconds": 0.8,
            "inference_peak_mb": 0.7,
            "training_peak_mb": 0.7,
        },
        "wall_seconds": time.time() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from learnreg.core.files import atomic_write

    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {args.out}")


def print_table(result: dict) -> None:
    rows, ratios, targets = (
        result["rows"],
        result["ratios_learnreg_over_voxelmorph"],
        result["targets"],
    )
    keys = ("inference_seconds", "training_seconds", "inference_peak_mb", "training_peak_mb")
    size = "×".join(map(str, result["size"]))
    print(
        f"\nCPU, {size}, batch 1, {result['threads']} threads, {result['clock']} clock, "
        f"{result['integration_steps']} integration steps, median of "
        f"{result['rounds']}×{result['repeats']['inference']} (inference) / "
        f"{result['rounds']}×{result['repeats']['training']} (training) runs"
    )
    cols = ["conv GMAC", "inference s", "train step s", "inference peak MB", "train peak MB"]
    print("| " + " | ".join([f"{'':<28}", *cols]) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in [" " * 28, *cols]) + "|")

    def line(name: str, values: list) -> None:
        cells = [f"{v:>{len(c)}}" for v, c in zip(values, cols, strict=True)]
        print("| " + " | ".join([f"{name:<28}", *cells]) + " |")

    def num(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for name, r in rows.items():
        line(
            name,
            [num(r.get("inference_conv_gmac"), ".1f")]
            + [num(r.get(k), ".2f" if "seconds" in k else ".0f") for k in keys],
        )
    line("ratio learnreg / voxelmorph", [""] + [num(ratios.get(k), ".2f") for k in keys])
    line("target (at most)", [""] + [num(targets.get(k), ".2f") for k in keys])


if __name__ == "__main__":
    main()
