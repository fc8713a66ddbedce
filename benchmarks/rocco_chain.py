"""Benchmark: Rocco et al.'s chain (affine network, then a TPS network on the affinely warped
image) against either stage alone, on held-out affine + TPS warps.

As Rocco et al. 2017: the affine stage trains on random affine warps, the TPS stage on random
TPS warps (3×3 control points), each by the grid loss, through ``learnreg.train``'s Trainer
(``global_networks.py``'s sources, photographs and brain slices at 144×192, 64×64 crops,
Adam ``--lr`` with a tenth of it for the last quarter, batch 16, seed 0). The held-out pairs
are warps ``T = A ∘ S`` of the held-out images (camera, coffee, coins, motorcycle, r85slice;
``data.random_warps`` kind ``affine+tps``: the affine ranges and TPS magnitude of the two
training sets together). Error: Rocco's grid error, the mean distance (pixels of the 64×64
crop) of a 20×20 point grid mapped by the predicted and the true transform. Rows: identity,
affine stage alone, TPS stage alone (on the unaligned pair), the chain
(:meth:`learnreg.methods.geometric_matching.GeometricMatching.chain`); 95 % bootstrap CIs over
the held-out pairs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rocco_chain.py --steps 1000

Writes benchmarks/results/rocco_chain.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from global_networks import AFFINE, HELDOUT_SEED, SIZE_2D, TPS_2D, fit, source, train_config  # noqa: E402

from learnreg.core.files import atomic_write  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.eval.statistics import bootstrap_ci  # noqa: E402
from learnreg.methods.geometric_matching import GeometricMatching  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.train.trainer import build_datasets  # noqa: E402

OUT = HERE / "results"


def train_stage(kind: str, args) -> tuple[GeometricMatching, float]:
    config = train_config(
        "geometric-matching",
        {"transform": kind},
        source(kind, 2, args.steps * args.batch, 16),
        optimizer={"lr": args.lr},
        steps=args.steps,
        batch_size=args.batch,
        val_every=10 * args.steps,
        checkpoint_every=args.steps,
        log_every=50,
        seed=0,
        output=str(OUT / "rocco_chain" / kind),
    )
    torch.manual_seed(0)
    method = create_method("geometric-matching", transform=kind)
    train_set, _ = build_datasets(config, method)
    seconds = fit(config, method, train_set)
    print(f"{kind} stage: {args.steps} steps, {seconds:.0f} s", flush=True)
    return method.eval(), seconds


def heldout_pairs(n: int, chain: GeometricMatching):
    """``n`` held-out ``affine+tps`` warps of the held-out images (the affine ranges and the
    TPS magnitude of the two training sets)."""
    options = {
        "kind": "warp",
        "transform": "affine+tps",
        "images": "both",
        "image_size": SIZE_2D,
        "length": 1,
        "val_length": n,
        "val_seed": HELDOUT_SEED,
        **AFFINE,
        **{k: v for k, v in TPS_2D.items() if k != "margin"},
    }
    config = train_config("geometric-matching", {"transform": "affine+tps"}, options, steps=1)
    return build_datasets(config, chain)[1]


@torch.no_grad()
def errors(chain: GeometricMatching, data) -> dict[str, list[float]]:
    """Grid errors per pair of the identity, each stage alone and the chain."""
    rows: dict[str, list[float]] = {"identity": [], "affine": [], "tps": [], "affine → tps": []}
    affine, tps = chain.stages["affine"], chain.stages["tps"]
    for i in range(0, len(data), 16):
        b = collate_pairs([data[k] for k in range(i, min(i + 16, len(data)))], data.grid)
        truth = chain.chain_points(b.target)
        pa = affine.predict(b.fixed, b.moving).extras["params"]
        pt = tps.predict(b.fixed, b.moving).extras["params"].flatten(1)
        both = chain.predict(b.fixed, b.moving).extras["params"]
        zero_a, zero_t = torch.zeros_like(pa), torch.zeros_like(pt)
        for name, params in (
            ("identity", torch.cat([zero_a, zero_t], 1)),
            ("affine", torch.cat([pa, zero_t], 1)),
            ("tps", torch.cat([zero_a, pt], 1)),
            ("affine → tps", both),
        ):
            d = (chain.chain_points(params) - truth).norm(dim=-1).mean(-1)
            rows[name] += d.tolist()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=OUT / "rocco_chain.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    affine, affine_s = train_stage("affine", a)
    tps, tps_s = train_stage("tps", a)
    chain = GeometricMatching.chain(affine, tps).eval()
    per_pair = errors(chain, heldout_pairs(a.pairs, chain))
    table = {k: [round(v, 4) for v in bootstrap_ci(vals)] for k, vals in per_pair.items()}
    report = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "torch": torch.__version__,
        "train_seconds": {"affine": affine_s, "tps": tps_s},
        "seconds": time.perf_counter() - t0,
        "grid_error_px": table,
        "per_pair": per_pair,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(a.output) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    print(f"| model | grid error px [95 % CI] ({a.pairs} held-out affine+TPS warps) |")
    print("|---|---|")
    for name, (est, lo, hi) in table.items():
        print(f"| {name} | {est:.2f} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
