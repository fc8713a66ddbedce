"""Benchmark: networks that regress global and low-dimensional transforms, vs the identity.

Held-out transform error after a realistic CPU training run of each method:

- ``geometric-matching`` (Rocco et al. 2017), affine and TPS (3×3 control points): 2D, 64×64
  crops of scikit-image photographs and ANTs' brain slices (resized to 144×192), random
  affine warps (rotation ±15°, translation ±6 px, scale ±15 %, shear ±0.1) or TPS warps
  (control points moved by up to ±6 px); error: mean distance of a 20×20 grid of points
  mapped by the predicted and the true transform (Rocco's grid, pixels);
- ``icstn`` (Lin & Lucey 2017): the same affine pairs, K = 4 recurrent steps; same error;
- ``tps-regression`` (Eppenhof et al. 2018): 3D, LPBA40 at 4 mm (40×48×40), 6×6×6 control
  points, the 4×4×4 inner ones moved by up to ±3 voxels (12 mm) and the border ones kept in
  place (they lie in the background of the whole-volume crop, where nothing shows their
  motion); error: mean control-point distance over all 216 points (voxels) and the mean
  dense endpoint error inside the brain (voxels).

Training images and held-out images never overlap: photographs and brain slices by the splits
of :mod:`learnreg.data.synthetic` (held-out: camera, coffee, coins, motorcycle, r85slice),
LPBA40 subjects S11–S34 for training and S35–S40 held out. Every method trains ``--steps``
Adam steps (learning rate ``--lr``, but 3e-4 for IC-STN, whose recurrent composition does not
leave the identity at 1e-3 in CPU-length runs; divided by 10 for the last quarter), batch ``--batch``
(``--batch3d`` in 3D), on freshly drawn random pairs (one new pair per item), seed 0.

    OMP_NUM_THREADS=2 python benchmarks/global_networks.py [--steps 600] [--threads 2]

Writes benchmarks/results/global_networks.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.random_warps import (  # noqa: E402
    LPBA_HELDOUT,
    LPBA_TRAIN,
    RandomWarpPairs,
    lpba_volumes,
)
from learnreg.data.synthetic import brain_slice_images, photo_images  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.methods.tps_regression import control_point_error  # noqa: E402

SIZE_2D = (144, 192)
CROP = (64, 64)
AFFINE = {"rotation": 15.0, "translation": 6.0, "scale": 0.15, "shear": 0.1, "margin": 16}
TPS_2D = {"grid_size": 3, "magnitude": 6.0, "margin": 16}
TPS_3D = {"grid_size": 6, "magnitude": 3.0, "fixed_border": True}

# name → (method, config, data kind, dimension)
METHODS = {
    "geometric-matching (affine)": ("geometric-matching", {"transform": "affine"}, "affine", 2),
    "geometric-matching (tps 3×3)": ("geometric-matching", {"transform": "tps"}, "tps", 2),
    "icstn (affine, K=4)": ("icstn", {"steps": 4}, "affine", 2),
    "tps-regression (3D, 6×6×6)": ("tps-regression", {}, "tps", 3),
}
# learning rates other than --lr
LEARNING_RATES = {"icstn (affine, K=4)": 3e-4}


def images_2d(split: str) -> dict[str, torch.Tensor]:
    return {**photo_images(split, SIZE_2D), **brain_slice_images(split, SIZE_2D)}


def pairs(kind: str, ndim: int, split: str, length: int, seed: int, cache: dict) -> RandomWarpPairs:
    key = (ndim, split)
    if key not in cache:
        if ndim == 2:
            cache[key] = images_2d(split)
        else:
            cache[key] = lpba_volumes(LPBA_TRAIN if split == "train" else LPBA_HELDOUT, 4)
    if ndim == 2:
        opts = AFFINE if kind == "affine" else TPS_2D
        return RandomWarpPairs(cache[key], kind, CROP, length, seed=seed, **opts)
    return RandomWarpPairs(cache[key], kind, None, length, seed=seed, **TPS_3D)


def errors(method, batch) -> dict[str, float]:
    """Held-out errors of ``method`` and of the identity on ``batch`` (evaluated in chunks)."""
    out: dict[str, list] = {"pred": [], "identity": [], "dense": [], "dense_identity": []}
    for i in range(0, batch.fixed.shape[0], 16):
        sub = type(batch)(
            batch.fixed[i : i + 16], batch.moving[i : i + 16], target=batch.target[i : i + 16]
        )
        pred = method.predict(sub.fixed, sub.moving)
        if method.name == "tps-regression":
            t = sub.target
            out["pred"].append(control_point_error(pred.extras["control"], t))
            out["identity"].append(control_point_error(torch.zeros_like(t), t))
            true = method.tps.dense(t)
            brain = (sub.moving > 0.05) | (sub.fixed > 0.05)
            for k, u in (("dense", pred.displacement - true), ("dense_identity", true)):
                e = u.norm(dim=1, keepdim=True)
                out[k].append((e * brain).flatten(1).sum(1) / brain.flatten(1).sum(1))
        else:
            m = method.model
            a = m.map_points(pred.extras["params"])
            b = m.map_points(sub.target)
            z = m.map_points(torch.zeros_like(sub.target))
            out["pred"].append((a - b).norm(dim=-1).mean(-1))
            out["identity"].append((z - b).norm(dim=-1).mean(-1))
    res = {k: float(torch.cat(v).mean()) for k, v in out.items() if v}
    return res


def train(method, data, steps: int, batch: int, lr: float, log_every: int = 50) -> float:
    """Adam, lr/10 for the last quarter; returns the wall time in seconds."""
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr)
    t0 = time.perf_counter()
    method.train()
    for s in range(steps):
        if s == (3 * steps) // 4:
            for g in opt.param_groups:
                g["lr"] = lr / 10
        b = collate_pairs([data[s * batch + i] for i in range(batch)])
        losses = method.loss(b, method(b.fixed, b.moving))
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        if log_every and (s + 1) % log_every == 0:
            err = {k: round(float(v), 4) for k, v in losses.items() if "error" in k}
            print(f"  step {s + 1}/{steps} {time.perf_counter() - t0:.0f}s {err}", flush=True)
    return time.perf_counter() - t0


def run_one(label: str, args, cache: dict, heldout_cache: dict, **overrides) -> dict:
    name, cfg, kind, ndim = METHODS[label]
    cfg = {**cfg, **overrides}
    steps = args.steps if ndim == 2 else args.steps3d
    batch = args.batch if ndim == 2 else args.batch3d
    n_test = args.pairs if ndim == 2 else args.pairs3d
    data = pairs(kind, ndim, "train", 10**7, 0, cache)
    key = (kind, ndim)
    if key not in heldout_cache:
        test = pairs(kind, ndim, "heldout", n_test, 12345, cache)
        heldout_cache[key] = collate_pairs([test[i] for i in range(n_test)])
    hb = heldout_cache[key]
    torch.manual_seed(0)
    method = create_method(name, **cfg)
    print(f"{label}: {sum(p.numel() for p in method.parameters())} parameters", flush=True)
    lr = LEARNING_RATES.get(label, args.lr)
    wall = train(method, data, steps, batch, lr)
    err = errors(method, hb)
    row = {
        "method": label,
        "name": name,
        "config": {k: v for k, v in cfg.items()},
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "train_seconds": round(wall, 1),
        "heldout_pairs": n_test,
        "error": round(err["pred"], 4),
        "identity_error": round(err["identity"], 4),
        "error_ratio": round(err["pred"] / err["identity"], 4),
        "unit": "px (64×64 crops)" if ndim == 2 else "voxels (4 mm)",
        "parameters": sum(p.numel() for p in method.parameters()),
    }
    if "dense" in err:
        row["dense_error"] = round(err["dense"], 4)
        row["dense_identity_error"] = round(err["dense_identity"], 4)
    print(f"  {json.dumps(row, ensure_ascii=False)}", flush=True)
    return row


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the 2D methods")
    p.add_argument("--steps3d", type=int, default=300, help="training steps in 3D")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch3d", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=256, help="held-out 2D pairs")
    p.add_argument("--pairs3d", type=int, default=48, help="held-out 3D pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--output", default=str(OUT / "global_networks.json"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other methods already in --output (runs split over processes)",
    )
    return p.parse_args(argv)


def _write(args, rows: list[dict]) -> list[dict]:
    """Write the JSON (merged with other methods' rows already there under --merge)."""
    result = {
        "benchmark": "global_networks",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "torch": torch.__version__,
        "args": vars(args),
        "results": rows,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and path.is_file():
        old = json.loads(path.read_text()).get("results", [])
        done = {r["method"] for r in rows}
        rows = [r for r in old if r["method"] not in done] + rows
        rows.sort(key=lambda r: list(METHODS).index(r["method"]))
        result["results"] = rows
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return rows


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cache: dict = {}
    heldout: dict = {}
    rows: list[dict] = []
    for label in args.methods:
        rows.append(run_one(label, args, cache, heldout))
        _write(args, rows)
    rows = _write(args, rows)
    print("\n| method | steps × batch | train time | held-out error | identity | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = (
            f" (dense {r['dense_error']} vs {r['dense_identity_error']})"
            if "dense_error" in r
            else ""
        )
        print(
            f"| {r['method']} | {r['steps']} × {r['batch']} | {r['train_seconds']:.0f} s | "
            f"{r['error']:.3f} {r['unit']}{extra} | {r['identity_error']:.3f} | "
            f"{r['error_ratio']:.2f} |"
        )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
