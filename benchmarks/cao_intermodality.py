"""Benchmark: Cao et al.'s inter-modality registration supervised by intra-modality similarity
(``cao-intermodality``) on LPBA40 T1 → T2-like, against a VoxelMorph trained for the same wall
time with an inter-modality similarity (LNCC between the T2-like fixed and the warped T1, which
squared local correlation tolerates), and the classical registrations.

Data (:mod:`learnreg.data.modalities`): fixed = S01's T2-like twin (made from its T1: tissue
contrast inverted, background dark, a smooth bias field of its own), moving = a subject's T1;
no registry ships an aligned same-subject multimodal brain pair. Every network in its own
fresh process, fixed seed, one thread; one RAS grid of 40×48×40 over S01's field of view
(4 mm); trained on S01 ← S11–S34 (no labels in any loss: Cao's loss compares the warped T1
with S01's T1 and, dual, the subject's warped T2-like image with S01's T2-like image);
scored on S01 ← S35–S40 (validation subjects, never trained on): mean Dice of the 56
structures on the 4 mm grid (labels nearest neighbour), % det J ≤ 0, s / pair. Classical:
learnreg's ``multimodal`` preset (MI) and ``default`` preset (LNCC) on the same pairs.

Writes benchmarks/results/cao_intermodality.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cao_intermodality.py --steps 600

A smoke run: ``--steps 2 --train S11 S12 --output /tmp/cao.json``.
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

from dense_fields_2d import (  # noqa: E402
    print_table,
    run_networks,
    scores,
    summary,
    train_loop,
    write_report,
)
from dense_fields_3d import test_pairs  # noqa: E402

from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.modalities import modality_pair_source  # noqa: E402
from learnreg.data.preprocess import NetworkGrid, Preprocessor  # noqa: E402
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402
from learnreg.optimize.classical import register  # noqa: E402

OUT = HERE / "results"
SHAPE = (40, 48, 40)
UNET = {"ndim": 3, "enc_features": [16, 32, 32], "dec_features": [32, 32, 32, 16]}
METHODS = {
    "cao (dual NCC)": ("cao-intermodality", {**UNET, "dual": True}),
    "cao (NCC on the T1 side only)": ("cao-intermodality", {**UNET, "dual": False}),
    "voxelmorph, inter-modality LNCC (same time)": (
        "voxelmorph",
        {**UNET, "similarity": {"lncc": {"window": 9}}, "reg_weight": 1.0},
    ),
}


def pairs(subjects):
    options = {"subjects": list(subjects), "val_subjects": list(LPBA_HELDOUT), "length": 10**6}
    return modality_pair_source(options, Preprocessor(NetworkGrid(SHAPE), percentiles=None))


def run_network(name: str, steps: int, seconds: float | None, lr: float, seed: int, subjects):
    torch.manual_seed(seed)
    method_name, config = METHODS[name]
    m = create_method(method_name, **config)
    train_set, val = pairs(subjects)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=2,
        shuffle=True,
        collate_fn=lambda items: collate_pairs(items, train_set.grid),
        generator=torch.Generator().manual_seed(seed),
    )
    info = train_loop(m, loader, steps, seconds, lr)
    rows = []
    for pair in test_pairs(val):
        t0 = time.perf_counter()
        with torch.no_grad():
            f, mv = pair["fixed"], pair["moving"]
            u = m(f.data[None], mv.data[None], f.grid).displacement
        rows.append(
            {**scores(u, pair), "seconds": time.perf_counter() - t0, "subject": pair["subject"]}
        )
    return {
        "name": name,
        "method": method_name,
        "config": config,
        "supervised": False,
        "time_reference": method_name == "cao-intermodality",
        "labels_in_training": False,
        **info,
        "pairs": rows,
    }


def classical_field(fixed, moving, preset: str) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    r = register(fixed, moving, preset)
    seconds = time.perf_counter() - t0
    g = fixed.grid
    pts = g.world_points().unsqueeze(0)
    moved = moving.grid.world_to_index(r.transform()(pts)[0])
    return (moved - g.world_to_index(pts[0])).movedim(-1, 0)[None].float(), seconds


def run_baselines(subjects) -> list[dict]:
    _, val = pairs(subjects)
    out = [{"name": "identity", "pairs": []}]
    for preset in ("multimodal", "default"):
        out.append({"name": f"classical {preset}", "pairs": []})
    for pair in test_pairs(val):
        out[0]["pairs"].append({**scores(torch.zeros(1, 3, *SHAPE), pair), "seconds": 0.0})
        for row, preset in zip(out[1:], ("multimodal", "default"), strict=True):
            u, seconds = classical_field(pair["fixed"], pair["moving"], preset)
            row["pairs"].append({**scores(u, pair), "seconds": seconds})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--output", type=Path, default=OUT / "cao_intermodality.json")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.run:
        print(json.dumps(run_network(a.run, a.steps, a.seconds, a.lr, a.seed, a.train)))
        return
    results = run_baselines(a.train)
    args = ["--steps", str(a.steps), "--lr", str(a.lr), "--seed", str(a.seed), "--train", *a.train]
    run_networks(__file__, a.methods, args, results)
    table = summary(results, None)
    write_report(a.output, a, table, results)
    print_table(table, None)


if __name__ == "__main__":
    main()
