"""Ablation: Nowruzi et al.'s re-crop from the full image against re-warping the patch.

Nowruzi, Laganière and Japkowicz (ICCV workshops 2017) feed each module of their hierarchy the
moving patch re-cropped from the whole moving image through the homography accumulated so
far; learnreg's ``homography-hierarchical`` re-warped the moving *patch*, whose borders go
black where the homography reaches outside it. ``context`` gives the network the image
around the patch (:class:`learnreg.data.synthetic.HomographyPairs` ``context``), and
``recrop`` chooses between the two inputs. One run, the protocol of ``benchmarks/homography.py``
(128-px patches, ρ = 32, 4× downsampled 32×32 network inputs, the same CPU-scale modules),
with 24 px of image around the patch (the most that 240-px-high images allow with ρ = 32):

- module 1 is trained once (``trainable_levels: [0]``; it sees only the centre patches, so
  it is the same network with or without context);
- from it, module 2 trains twice for the same steps and data, once re-cropping and once
  re-warping (module 1 frozen, Nowruzi's stage-wise schedule);
- ``--levels 4`` also stacks modules 3 and 4 on the re-cropping hierarchy (each trained in
  turn, the earlier ones frozen), Nowruzi's deepest stack.

Scored on held-out photo and brain pairs (images never trained on; the pairs carry the same
context): mean corner error at the four patch corners in pixels of the 128-px patch, with
95 % bootstrap CIs and the paired difference re-crop − re-warp. No labels anywhere.

    nice -n 10 python benchmarks/homography_recrop.py --steps 2000 --threads 1

Writes benchmarks/results/homography_recrop.json and prints a Markdown table.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from homography import DOWN, PATCH, RHO, log, pool_source, train_stage  # noqa: E402

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.synthetic import HomographyPairs, brain_slice_images, photo_images  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci, paired_comparison  # noqa: E402
from learnreg.methods.homography import corner_error, patch_corners  # noqa: E402
from learnreg.spatial.homography import Homography  # noqa: E402

NAME = "homography-hierarchical"
CONTEXT_PX = 24  # full resolution; 6 voxels of the 4× downsampled network grid


def shift(c: float) -> torch.Tensor:
    s = torch.eye(3, dtype=torch.float64)
    s[:2, 2] = c
    return s


def patch_errors(matrix_grid: torch.Tensor, target_grid: torch.Tensor) -> np.ndarray:
    """Corner errors (px of the 128-px patch) at the patch corners of homographies on the
    network grid of the context pairs (patch at offset ``CONTEXT_PX / DOWN``)."""
    c, f = CONTEXT_PX / DOWN, float(DOWN)
    size = PATCH // DOWN + 2 * int(c)
    grown = patch_corners(size, torch.float64)[None].expand(target_grid.shape[0], 4, 2)
    true = Homography.from_corners(grown, grown + target_grid.double()).homogeneous()
    scale = torch.tensor([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1]]).double()
    to_patch = scale @ torch.linalg.inv(shift(c))  # grid index → full-res patch index
    corners = patch_corners(PATCH, torch.float64)[None].expand_as(grown)

    def full(h: torch.Tensor) -> torch.Tensor:
        h = to_patch @ h.double() @ torch.linalg.inv(to_patch)
        return Homography.from_matrix(h / h[:, 2:, 2:])(corners) - corners

    return corner_error(full(matrix_grid), full(true)).numpy()


@torch.no_grad()
def predict(method, batch) -> torch.Tensor:
    method.eval()
    return torch.cat(
        [
            method.predict(batch.fixed[i : i + 64], batch.moving[i : i + 64]).extras["homography"]
            for i in range(0, batch.fixed.shape[0], 64)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="module-1 steps (others: half)")
    ap.add_argument("--levels", type=int, default=2, choices=(2, 4))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=32000)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--brain-pairs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=OUT / "homography_recrop.json")
    ap.add_argument("--runs", type=Path, default=OUT / "runs" / "homography_recrop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = {**pool_source(args), "context": CONTEXT_PX}
    net = {"context": CONTEXT_PX // DOWN}
    tests = {}
    for tname, images, n in (
        ("photos", photo_images("heldout"), args.pairs),
        ("brain", brain_slice_images("heldout"), args.brain_pairs),
    ):
        ds = HomographyPairs(
            images, length=n, patch_size=PATCH, rho=RHO, downsample=DOWN, seed=2024,
            context=CONTEXT_PX,
        )  # fmt: skip
        tests[tname] = collate_pairs([ds[i] for i in range(n)])

    levels = args.levels
    half = max(1, args.steps // 2)
    training, models = {}, {}
    m1, info, ckpt = train_stage(
        NAME, {**net, "levels": levels, "trainable_levels": [0]}, args.steps, args,
        "module1", source=source,
    )  # fmt: skip
    training["module 1"] = info
    models["module 1 alone"] = (m1, 1, "module 1")
    for recrop in (True, False):
        label = "re-crop" if recrop else "re-warp"
        m, info, last = train_stage(
            NAME, {**net, "levels": levels, "recrop": recrop, "trainable_levels": [1]}, half,
            args, f"module2-{label}", init=ckpt, source=source,
        )  # fmt: skip
        training[f"module 2, {label}"] = info
        models[f"2 modules, {label}"] = (m, 2, f"module 2, {label}")
        if recrop:
            deep = last
    if levels == 4:
        for k in (2, 3):
            m, info, deep = train_stage(
                NAME, {**net, "levels": 4, "recrop": True, "trainable_levels": [k]}, half,
                args, f"module{k + 1}-re-crop", init=deep, source=source,
            )  # fmt: skip
            training[f"module {k + 1}, re-crop"] = info
            models[f"{k + 1} modules, re-crop"] = (m, k + 1, f"module {k + 1}, re-crop")

    results: dict = {}
    errors: dict = {}
    for tname, batch in tests.items():
        zero = torch.eye(3, dtype=torch.float64).expand(batch.fixed.shape[0], 3, 3)
        rows = {"identity": patch_errors(zero, batch.target)}
        for label, (m, k, _) in models.items():
            active = type(m)(**{**m.config, "levels": k, "trainable_levels": None})
            active.stages.load_state_dict(m.stages[:k].state_dict())
            rows[label] = patch_errors(predict(active, batch), batch.target)
        errors[tname] = rows
        results[tname] = {}
        for label, e in rows.items():
            est, lo, hi = bootstrap_ci(e, np.mean)
            results[tname][label] = {"mean": est, "ci95": [lo, hi], "median": float(np.median(e))}
        d = paired_comparison(rows["2 modules, re-crop"], rows["2 modules, re-warp"])
        results[tname]["re-crop minus re-warp"] = d
    report = {
        "protocol": {
            "patch_px": PATCH,
            "rho_px": RHO,
            "downsample": DOWN,
            "context_px": CONTEXT_PX,
            "errors_in": "pixels of the 128-px patch, at its corners",
            "labels_used": False,
        },  # fmt: skip
        "config": {**vars(args), "output": str(args.output), "runs": str(args.runs)},
        "training": training,
        "results": results,
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    names = list(tests)
    print("| hierarchy (no labels) | " + " | ".join(f"{t}: mean [95 % CI] px" for t in names)
          + " | training steps, wall s |")  # fmt: skip
    print("|---" * (len(names) + 2) + "|")
    for label in errors[names[0]]:
        cells = []
        for t in names:
            r = results[t][label]
            cells.append(f"{r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
        tr = training.get(models[label][2]) if label in models else None
        extra = "" if tr is None else f"{tr['steps']}, {tr['wall_s']:.0f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {extra} |")
    for t in names:
        d = results[t]["re-crop minus re-warp"]
        log(f"{t}: re-crop − re-warp {d}")
    log(f"total {report['total_wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
