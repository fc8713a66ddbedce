"""Benchmark: learnreg's DeepFlow vs OpenCV contrib's DeepFlow on real slices with known warps.

Pairs: ANTs' six real 2D brain slices (``ants2d``, 256×256), each under ``--seeds`` random
large warps (the protocol of ``tests/methods/test_deepflow.py``: a 128×128 crop as the moving
image; the fixed image the slice sampled through a translation of ``--shift`` × 128 pixels,
a rotation of up to ±10° and a smooth field of up to 3 %), so the true flow is known. No
labels are used by anything (no method is trained: DeepFlow has no learned weights). The
end-point error (EPE, pixels) is averaged where ``x + u(x)`` stays in the crop and the fixed
image is not background; 95 % percentile-bootstrap CIs over the pairs
(:func:`learnreg.eval.statistics.bootstrap_ci`), also of the paired difference to OpenCV.

Methods: the identity; learnreg ``deepflow`` with the paper's settings (deep matching + the
variational flow with its matching term, η = 0.95); the same without matches (an ablation:
the variational flow alone); OpenCV's ``cv2.optflow.createOptFlow_DeepFlow`` with its
defaults (the same δ, γ, α, σ, η, 5 fixed points, 25 SOR sweeps, ω = 1.6) — which is only
DeepFlow's variational part: OpenCV runs **no deep matching** (its documentation points to the
separate DeepMatching code), on 8-bit images. Times are per pair, one thread.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/deepflow.py --seeds 2
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/deepflow.py --seeds 2 --shift 0.02 \
        --out benchmarks/results/deepflow_small.json   # small motions (≈ 4 px)

Needs opencv-contrib-python-headless (benchmark-only). Writes benchmarks/results/deepflow.json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from tests.methods.test_deepflow import epe, known_warp  # noqa: E402

SLICES = ("r16", "r27", "r30", "r62", "r64", "r85")


def opencv_deepflow(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """OpenCV's DeepFlow (defaults) fixed → moving, as ``(1, 2, H, W)`` (row, column)."""
    import cv2

    to8 = [np.clip(t[0, 0].numpy() * 255 + 0.5, 0, 255).astype(np.uint8) for t in (fixed, moving)]
    flow = cv2.optflow.createOptFlow_DeepFlow().calc(to8[0], to8[1], None)  # (H, W, [x, y])
    return torch.from_numpy(flow[..., ::-1].copy()).permute(2, 0, 1)[None].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2, help="warps per slice")
    ap.add_argument("--shift", type=float, default=0.15, help="translation / crop size")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--out", type=Path, default=OUT / "deepflow.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    ours = create_method("deepflow")
    plain = create_method("deepflow", matching=False)
    runs = {
        "identity": lambda f, m: torch.zeros(1, 2, *f.shape[2:]),
        "learnreg deepflow": lambda f, m: ours.predict(f, m).displacement,
        "learnreg variational only (no matches)": lambda f, m: plain.predict(f, m).displacement,
        "OpenCV optflow DeepFlow (no matching)": opencv_deepflow,
    }
    records = []
    for name in SLICES:
        for seed in range(args.seeds):
            fixed, moving, u, valid = known_warp(args.data, name, seed, args.size, args.shift)
            row = {
                "slice": name,
                "seed": seed,
                "mean_motion_px": epe(torch.zeros_like(u), u, valid),
            }
            for method, run in runs.items():
                t0 = time.perf_counter()
                w = run(fixed, moving)
                row[method] = {"epe": epe(w, u, valid), "seconds": time.perf_counter() - t0}
            records.append(row)
            print(name, seed, {k: round(v["epe"], 2) for k, v in row.items() if isinstance(v, dict)},
                  flush=True)  # fmt: skip
    summary = {}
    for method in runs:
        e = np.array([r[method]["epe"] for r in records])
        t = np.array([r[method]["seconds"] for r in records])
        est, lo, hi = bootstrap_ci(e, np.mean)
        cv = "OpenCV optflow DeepFlow (no matching)"
        diff = e - np.array([r[cv]["epe"] for r in records])
        d = bootstrap_ci(diff, np.mean) if method != cv else (0.0, 0.0, 0.0)
        summary[method] = {
            "epe_mean": est, "epe_ci95": [lo, hi], "seconds_mean": float(t.mean()),
            "minus_opencv": d[0], "minus_opencv_ci95": [d[1], d[2]],
        }  # fmt: skip
    lines = [
        f"DeepFlow on {len(records)} real ants2d slice pairs ({args.size}×{args.size}, known "
        f"warps: translation {args.shift:.0%} of the crop, ±10°, smooth 3 %); no labels used "
        "(nothing is trained)",
        "",
        "| method | EPE px (95 % CI) | minus OpenCV (95 % CI) | s / pair |",
        "|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['epe_mean']:.2f} ({s['epe_ci95'][0]:.2f}–{s['epe_ci95'][1]:.2f}) "
            f"| {s['minus_opencv']:+.2f} ({s['minus_opencv_ci95'][0]:+.2f}–"
            f"{s['minus_opencv_ci95'][1]:+.2f}) | {s['seconds_mean']:.2f} |"
        )
    print("\n".join(lines))
    result = {
        "protocol": lines[0],
        "labels_used_in_training": False,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "opencv": cv2.__version__, "threads": 1},
        "summary": summary,
        "pairs": records,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
