"""Ablation: CoordConv (Liu et al., NeurIPS 2018) in a transform regressor, with and without.

Liu et al. show that plain convolutions struggle to map between pixel positions and
coordinates, and that appending normalized coordinate channels to the input (CoordConv) helps
any task that regresses positions — such as a network regressing transform parameters. This
script trains IC-STN (:mod:`learnreg.methods.icstn`) or, with ``--method geometric-matching``,
Rocco et al.'s affine geometric matching network (CoordConv in its siamese tower), with the
same recipe as
``benchmarks/global_networks.py``: 64×64 crops of real photographs and brain slices, random
affine warps) twice, identically — same seed, same initial weights of every layer but the
first (which has ``ndim`` more input channels with CoordConv), same training pairs in the same
order, same steps — once with ``coord_conv=False`` and once with ``coord_conv=True``, for
each of ``--seeds``, and reports the held-out grid error (mean distance of a 20×20 grid of
points mapped by the predicted and the true transform, pixels) of both. Training runs through
``learnreg.train`` (``global_networks.fit``: the Trainer, lr ÷ 10 for the last quarter).

    OMP_NUM_THREADS=1 python benchmarks/coordconv_ablation.py --method icstn --steps 1000 \
        --lr 3e-4 --seeds 0 1 --threads 1

Prints a Markdown table and writes benchmarks/results/coordconv_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import global_networks as gn  # noqa: E402

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.train.trainer import build_datasets  # noqa: E402


def _create(args, coord_conv: bool):
    if args.method == "icstn":
        return create_method("icstn", steps=args.icstn_steps, coord_conv=coord_conv)
    return create_method("geometric-matching", transform="affine", coord_conv=coord_conv)


def run(coord_conv: bool, seed: int, args) -> dict:
    name = "icstn" if args.method == "icstn" else "geometric-matching"
    cfg = (
        {"steps": args.icstn_steps, "coord_conv": coord_conv}
        if args.method == "icstn"
        else {"transform": "affine", "coord_conv": coord_conv}
    )
    config = gn.train_config(
        name,
        cfg,
        gn.source("affine", 2, args.steps * args.batch, args.pairs, seed),
        optimizer={"lr": args.lr},
        steps=args.steps,
        batch_size=args.batch,
        val_every=10 * args.steps,
        checkpoint_every=args.steps,
        log_every=100,
        seed=seed,
        output=str(Path(args.runs) / f"{args.method}-cc{int(coord_conv)}-seed{seed}"),
    )
    torch.manual_seed(seed)
    method = _create(args, coord_conv)
    # identical initial weights apart from the first layer's coordinate inputs
    torch.manual_seed(seed)
    ref = _create(args, False)
    own = method.state_dict()
    for k, v in ref.state_dict().items():
        key = k if k in own else k.replace(".layers.0.", ".layers.0.block.")  # CoordConv block
        if own[key].shape == v.shape:
            own[key] = v
        else:  # first conv: copy the image channels, coordinate channels start at zero
            w = torch.zeros_like(own[key])
            w[:, : v.shape[1]] = v
            own[key] = w
    method.load_state_dict(own)
    train_set, heldout = build_datasets(config, method)
    wall = gn.fit(config, method, train_set)
    err = gn.errors(method, heldout)
    return {
        "coord_conv": coord_conv,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(wall, 1),
        "error": round(err["pred"], 4),
        "identity_error": round(err["identity"], 4),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method", choices=("icstn", "geometric-matching"), default="icstn")
    p.add_argument("--icstn-steps", type=int, default=4, help="IC-STN's recurrent steps K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(gn.OUT / "coordconv_ablation.json"))
    p.add_argument("--runs", default=str(gn.OUT / "runs" / "coordconv_ablation"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        for cc in (False, True):
            print(f"{args.method} coord_conv={cc} seed={seed}", flush=True)
            rows.append(run(cc, seed, args))
            print(f"  {rows[-1]}", flush=True)
    result = {
        "benchmark": "coordconv_ablation",
        "method": args.method,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "torch": torch.__version__,
        "args": vars(args),
        "results": rows,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(
        f"\n| {args.method} | seed | steps × batch | train time | held-out grid error (px) | identity |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = "with CoordConv" if r["coord_conv"] else "without CoordConv"
        print(
            f"| {name} | {r['seed']} | {r['steps']} × {r['batch']} | {r['train_seconds']:.0f} s "
            f"| {r['error']:.3f} | {r['identity_error']:.3f} |"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
