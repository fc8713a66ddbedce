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
LPBA40 subjects S11–S34 for training and S35–S40 held out. Every method trains through
``learnreg.train`` (the ``warp`` source of :mod:`learnreg.data.random_warps`, ``build_datasets``
and the ``Trainer``: exactly what ``learnreg train`` runs) for ``--steps`` Adam steps
(learning rate ``--lr``, but 3e-4 for IC-STN, whose recurrent composition does not leave the
identity at 1e-3 in CPU-length runs; divided by 10 for the last quarter: the run stops at
three quarters and resumes with the lower rate), batch ``--batch`` (``--batch3d`` in 3D), on
freshly drawn random pairs (one new pair per item), seed 0. The held-out pairs are the
source's validation set (seed 12345), scored once at the end of training. Images are min-max
scaled (``data.percentiles: null``, as the pairs of the README's table); the LPBA40 volumes are
put on their 4 mm RAS grid by the recorded preprocessing (blur and world-space resampling).

    OMP_NUM_THREADS=1 python benchmarks/global_networks.py --steps 2000 --steps3d 1500 --threads 1

Writes benchmarks/results/global_networks.json (and the training runs under
benchmarks/results/runs/global_networks/) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.methods.tps_regression import control_point_error  # noqa: E402
from learnreg.train.config import TrainConfig  # noqa: E402
from learnreg.train.trainer import Trainer, build_datasets  # noqa: E402

SIZE_2D = [144, 192]
AFFINE = {"rotation": 15.0, "translation": 6.0, "scale": 0.15, "shear": 0.1, "margin": 16}
TPS_2D = {"grid_size": 3, "magnitude": 6.0, "margin": 16}
TPS_3D = {"grid_size": 6, "magnitude": 3.0, "fixed_border": True}
HELDOUT_SEED = 12345

# name → (method, config, data kind, dimension)
METHODS = {
    "geometric-matching (affine)": ("geometric-matching", {"transform": "affine"}, "affine", 2),
    "geometric-matching (tps 3×3)": ("geometric-matching", {"transform": "tps"}, "tps", 2),
    "icstn (affine, K=4)": ("icstn", {"steps": 4}, "affine", 2),
    "tps-regression (3D, 6×6×6)": ("tps-regression", {}, "tps", 3),
}
# learning rates other than --lr
LEARNING_RATES = {"icstn (affine, K=4)": 3e-4}


def source(kind: str, ndim: int, length: int, val_length: int, seed: int = 0) -> dict:
    """The ``data.synthetic`` options of the pairs (training set of ``length``, held-out set
    of ``val_length`` pairs of the held-out images)."""
    common = {"kind": "warp", "transform": kind, "length": length, "seed": seed}
    common.update(val_length=val_length, val_seed=HELDOUT_SEED)
    if ndim == 2:
        opts = AFFINE if kind == "affine" else TPS_2D
        return {**common, "images": "both", "image_size": SIZE_2D, **opts}
    return {**common, "images": "lpba40", **TPS_3D}


def train_config(name: str, method_config: dict, synthetic: dict, **kw) -> TrainConfig:
    """A ``learnreg train`` configuration of the benchmark's runs."""
    return TrainConfig.from_dict(
        {
            "method": name,
            "method_config": method_config,
            "data": {"synthetic": synthetic, "percentiles": None, "levels": 0},
            "device": "cpu",
            "progress": False,
            **kw,
        }
    )


def fit(config: TrainConfig, method, train_set, val_set=None, decay_at: float = 0.75) -> float:
    """Train with ``learnreg.train``'s Trainer: ``config.optimizer.lr`` for the first
    ``decay_at`` of the steps, then a tenth of it (the run stops there and resumes with the
    lower rate: optimizer state, data order and RNG continue exactly). Returns wall seconds."""
    t0 = time.perf_counter()
    switch = int(decay_at * config.steps)
    Trainer(config, method, train_set, val_set).fit(until=switch)
    if switch < config.steps:
        low = TrainConfig.from_dict(config.to_dict())
        low.optimizer.lr = config.optimizer.lr / 10
        low.optimizer.groups = {
            g: {**o, "lr": o["lr"] / 10} if "lr" in o else o
            for g, o in config.optimizer.groups.items()
        }
        Trainer(low, method, train_set, val_set).fit(resume=True)
    return time.perf_counter() - t0


def errors(method, dataset) -> dict[str, float]:
    """Held-out errors of ``method`` and of the identity on ``dataset`` (in chunks)."""
    out: dict[str, list] = {"pred": [], "identity": [], "dense": [], "dense_identity": []}
    n = len(dataset)
    for i in range(0, n, 16):
        sub = collate_pairs([dataset[k] for k in range(i, min(i + 16, n))], dataset.grid)
        pred = method.predict(sub.fixed, sub.moving, sub.grid)
        out["pred"].append(method.transform_error(sub, pred))
        t = sub.target
        if method.name == "tps-regression":
            out["identity"].append(control_point_error(torch.zeros_like(t), t))
            true = method.tps.dense(t)
            brain = (sub.moving > 0.05) | (sub.fixed > 0.05)
            for k, u in (("dense", pred.displacement - true), ("dense_identity", true)):
                e = u.norm(dim=1, keepdim=True)
                out[k].append((e * brain).flatten(1).sum(1) / brain.flatten(1).sum(1))
        else:
            out["identity"].append(method.model.grid_errors(torch.zeros_like(t), t))
    return {k: float(torch.cat(v).mean()) for k, v in out.items() if v}


def run_one(label: str, args, **overrides) -> dict:
    name, cfg, kind, ndim = METHODS[label]
    cfg = {**cfg, **overrides}
    steps = args.steps if ndim == 2 else args.steps3d
    batch = args.batch if ndim == 2 else args.batch3d
    n_test = args.pairs if ndim == 2 else args.pairs3d
    lr = LEARNING_RATES.get(label, args.lr)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    config = train_config(
        name,
        cfg,
        source(kind, ndim, steps * batch, n_test),
        optimizer={"lr": lr},
        steps=steps,
        batch_size=batch,
        val_every=10 * steps,  # the held-out pairs are scored here, once
        checkpoint_every=steps,
        log_every=50,
        seed=0,
        output=str(Path(args.runs) / slug),
    )
    torch.manual_seed(0)
    method = create_method(name, **cfg)
    train_set, heldout = build_datasets(config, method)
    print(f"{label}: {sum(p.numel() for p in method.parameters())} parameters", flush=True)
    wall = fit(config, method, train_set)
    err = errors(method, heldout)
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
    p.add_argument("--runs", default=str(OUT / "runs" / "global_networks"), help="train outputs")
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
    rows: list[dict] = []
    for label in args.methods:
        rows.append(run_one(label, args))
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
