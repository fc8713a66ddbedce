"""Benchmark: Quicksilver (prediction, and prediction + correction) against the classical LDDMM
that produced its training momenta, on LPBA40 at 4 mm.

Data: one RAS grid of 40×48×40 over S01's field of view (4 mm), no affine pre-alignment (the
classical LDDMM starts from the identity too). Training momenta: learnreg's classical LDDMM
(:func:`learnreg.data.lddmm_momenta.momentum_registration_config`: LNCC, levels 1/2 and 1 with
the momentum on the image grid, the ``lddmm`` preset's kernel) of S01 ← S11–S34, computed once
into ``--cache``; no labels in any loss. Quicksilver (:mod:`learnreg.methods.quicksilver`,
8 features unless ``--features``) trains its prediction network ``--steps`` steps (2 pairs ×
8 random 15³ patches per step, Adam), then its correction network ``--correction-steps``
steps on the residual. Scored on S01 ← S35–S40 (validation subjects, never trained on): mean
Dice of the 56 structures on the 4 mm grid (labels nearest neighbour), % det J ≤ 0,
inverse-consistency error (mean |φ⁻¹∘φ − id| in voxels, both maps from the geodesic's flow),
seconds per pair; 95 % bootstrap CIs over pairs. The classical LDDMM runs on those pairs in a
second process at the same time as training (each process one thread; the machine has two
cores). Writes benchmarks/results/quicksilver_lpba40.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quicksilver_lpba40.py --steps 1200 \\
        --correction-steps 500 --features 8

A smoke run: ``--steps 2 --correction-steps 2 --train S11 S12 --val S35 --output /tmp/qs.json``
(momenta of S11, S12 are computed on first use: about 90 s each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from dense_fields_2d import write_report  # noqa: E402
from diffeo_2d import print_table, summary  # noqa: E402

from learnreg.core.image import Image  # noqa: E402
from learnreg.data.lddmm_momenta import (  # noqa: E402
    lddmm_momentum,
    lddmm_momentum_source,
    momentum_registration_config,
)
from learnreg.data.prealign import default_cache_dir  # noqa: E402
from learnreg.data.preprocess import NetworkGrid, Preprocessor  # noqa: E402
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN  # noqa: E402
from learnreg.methods.base import RegistrationBatch  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.metrics import mean_dice  # noqa: E402
from learnreg.spatial.differential import jacobian_determinant  # noqa: E402
from learnreg.spatial.fields import compose_displacements  # noqa: E402
from learnreg.spatial.lddmm import GeodesicShooting  # noqa: E402
from learnreg.spatial.sampling import warp  # noqa: E402

OUT = HERE / "results"
SHAPE = (40, 48, 40)


def datasets(train, val, cache):
    options = {"subjects": list(train), "val_subjects": list(val), "cache": str(cache)}
    return lddmm_momentum_source(options, Preprocessor(NetworkGrid(SHAPE), percentiles=None))


def score(fixed_lab, moving_lab, backward, forward) -> dict:
    """Scores of label maps ``(1, *S)`` and the maps ``(1, 3, *S)`` (voxels)."""
    labels = [int(v) for v in torch.unique(fixed_lab) if v != 0]
    warped = warp(moving_lab[None].float(), backward, mode="nearest")[0].long()
    return {
        "dice": mean_dice(fixed_lab, warped, labels),
        "folding_percent": float((jacobian_determinant(backward) <= 0).double().mean() * 100),
        "ic": float(compose_displacements(backward, forward).norm(dim=1).mean()),
    }


def train_stage(method, data, steps: int, lr: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    method.train()
    t0 = time.perf_counter()
    for step in range(steps):
        items = [data[int(i)] for i in torch.randint(len(data.subjects), (2,), generator=g)]
        b = RegistrationBatch(
            torch.stack([it["fixed"] for it in items]),
            torch.stack([it["moving"] for it in items]),
            target=torch.stack([it["target"] for it in items]),
            grid=data.grid,
        )
        loss = method.loss(b, method(b.fixed, b.moving, b.grid))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}: L1 {float(loss):.4f}", flush=True)
    return time.perf_counter() - t0


def evaluate(method, data) -> list[dict]:
    rows = []
    for i in range(len(data.subjects)):
        it = data[i]
        t0 = time.perf_counter()
        out = method.predict(it["fixed"][None], it["moving"][None], data.grid)
        geodesic = out.transform
        backward, forward = geodesic.maps()
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "subject": it["names"][1],
                **score(it["fixed_labels"], it["moving_labels"], backward, forward),
                "seconds": seconds,
            }
        )
    return rows


def run_quicksilver(args) -> list[dict]:
    torch.manual_seed(args.seed)
    train, val = datasets(args.train, args.val, args.cache)
    config = {"ndim": 3, "features": args.features}
    prediction = create_method("quicksilver", **config)
    print(f"prediction network: {args.steps} steps", flush=True)
    t_pred = train_stage(prediction, train, args.steps, args.lr, args.seed)
    correction = create_method("quicksilver", **config, stage="correction")
    correction.load_state_dict(correction.initial_state(prediction.state_dict()))
    print(f"correction network: {args.correction_steps} steps", flush=True)
    t_corr = train_stage(correction, train, args.correction_steps, args.lr, args.seed + 1)
    common = {"config": config, "labels_in_training": False, "supervised": True}
    return [
        {
            "name": "quicksilver (prediction)",
            **common,
            "steps": args.steps,
            "train_seconds": t_pred,
            "pairs": evaluate(prediction, val),
        },
        {
            "name": "quicksilver (prediction + correction)",
            **common,
            "steps": args.steps + args.correction_steps,
            "train_seconds": t_pred + t_corr,
            "pairs": evaluate(correction, val),
        },
    ]


def run_classical(args) -> list[dict]:
    """The LDDMM of the training momenta, and the identity, on the validation pairs."""
    _, val = datasets(args.train[:1], args.val, args.cache)
    config = momentum_registration_config()
    rows, identity = [], []
    zero = torch.zeros(1, 3, *SHAPE)
    for i in range(len(val.subjects)):
        it = val[i]
        fixed = Image(it["fixed"], val.grid, "S01")
        moving = Image(it["moving"], val.grid, it["names"][1])
        t0 = time.perf_counter()
        momentum, _ = lddmm_momentum(fixed, moving, config)
        d = config.deformable
        geodesic = GeodesicShooting(
            val.grid, momentum[None], **d.kernel, steps=d.steps, physical=True
        )
        backward, forward = geodesic.maps()
        seconds = time.perf_counter() - t0
        fl, ml = it["fixed_labels"], it["moving_labels"]
        rows.append(
            {"subject": it["names"][1], **score(fl, ml, backward, forward), "seconds": seconds}
        )
        identity.append({"subject": it["names"][1], **score(fl, ml, zero, zero), "seconds": 0.0})
    return [
        {"name": "classical LDDMM (the training momenta's)", "pairs": rows},
        {"name": "identity", "pairs": identity},
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--correction-steps", type=int, default=500)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--val", nargs="+", default=list(LPBA_HELDOUT))
    p.add_argument("--cache", type=Path, default=default_cache_dir() / "lddmm-momenta")
    p.add_argument("--output", type=Path, default=OUT / "quicksilver_lpba40.json")
    p.add_argument("--part", choices=("all", "classical"), default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "classical":  # the second process: print its results as JSON
        print("RESULT " + json.dumps(run_classical(args)), flush=True)
        return
    datasets(args.train, [], args.cache)  # training momenta first (cached after)
    cmd = [sys.executable, __file__, "--part", "classical", "--cache", str(args.cache)]
    cmd += ["--train", *args.train[:1], "--val", *args.val]
    classical = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    results = run_quicksilver(args)
    out, _ = classical.communicate()
    if classical.returncode:
        raise SystemExit(f"the classical run failed ({classical.returncode})")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    results += json.loads(line[len("RESULT ") :])
    table = summary(results)
    write_report(args.output, args, table, results)
    print_table(table, "voxels")


if __name__ == "__main__":
    main()
