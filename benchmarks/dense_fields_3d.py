"""Benchmark: the 3D dense-field networks of issue 15 on LPBA40 — SVF-Net (supervised by
reference velocities from the training subjects' label maps) and RegNet (supervised by
simulated smooth fields) — against an unsupervised diffeomorphic VoxelMorph trained for the
same wall time on the same subjects, and the classical default registration.

Protocol (every network in its own fresh process, fixed seeds, one thread; one RAS network
grid of 40×48×40 over S01's field of view, 4 mm, as ``data.shape: [40, 48, 40]`` gives):

* SVF-Net: S01 (fixed) ← S11–S34 (moving), target = the reference velocity of registering
  their one-hot label maps (:mod:`learnreg.data.reference_fields`, computed once into
  ``--cache``); U-Net 16-32-32 / 32-32-32-16, 7 integration steps; Adam ``--lr``, batch 2;
* RegNet: dense random warps (affine + B-spline fields of 8 and 4 voxels, up to 2 and 1
  voxels) of S11–S34, width 0.25, 2 pairs × 8 patch centres per step;
* VoxelMorph (unsupervised, diffeomorphic, LNCC + diffusion, no labels): the S01 ← S11–S34
  pairs for the mean wall time of the two supervised runs;
* scored on S01 ← S35–S40 (validation subjects of the project's split, never trained on):
  mean Dice of the 56 structures on the 4 mm grid (labels by nearest neighbour), % voxels with
  det J ≤ 0, seconds per pair; end-point error on 2 dense random warps of each of S35–S40
  (true field known; voxels).

Writes benchmarks/results/dense_fields_3d.json and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_fields_3d.py --steps 600

A smoke run: ``--steps 2 --train S11 S12 --output /tmp/dense_fields_3d.json``.
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
    classical_displacement,
    print_table,
    run_networks,
    scores,
    summary,
    train_loop,
    write_report,
)

from learnreg.core.image import Image  # noqa: E402
from learnreg.data.datasets import collate_pairs  # noqa: E402
from learnreg.data.preprocess import NetworkGrid, Preprocessor  # noqa: E402
from learnreg.data.random_warps import LPBA_HELDOUT, LPBA_TRAIN, warp_source  # noqa: E402
from learnreg.data.reference_fields import svf_reference_source  # noqa: E402
from learnreg.methods.flownet import endpoint_error  # noqa: E402
from learnreg.methods.registry import create_method  # noqa: E402

OUT = HERE / "results"
SHAPE = (40, 48, 40)
WARPS = {
    "transform": "dense",
    "images": "lpba40",
    "rotation": 5,
    "translation": 2,
    "scale": 0.05,
    "shear": 0.02,
    "field_spacings": [8, 4],
    "field_magnitudes": [2, 1],
}
METHODS = {
    "svf-net": (
        "svf-net",
        {"ndim": 3, "enc_features": [16, 32, 32], "dec_features": [32, 32, 32, 16]},
        True,
    ),
    "regnet": ("regnet", {"ndim": 3, "width": 0.25, "patches_per_pair": 8}, True),
    "voxelmorph (same time)": (
        "voxelmorph",
        {
            "ndim": 3,
            "enc_features": [16, 32, 32],
            "dec_features": [32, 32, 32, 16],
            "integration_steps": 7,
            "reg_weight": 1.0,
        },
        False,
    ),
}


def pre() -> Preprocessor:
    return Preprocessor(NetworkGrid(SHAPE), percentiles=None)


def atlas_pairs(subjects, cache: Path):
    """S01 ← ``subjects`` with their reference velocities (computed once into ``cache``), and
    S01 ← S35–S40 with labels only (no reference is made for them)."""
    options = {
        "subjects": list(subjects),
        "val_subjects": list(LPBA_HELDOUT),
        "cache": str(cache),
        "length": 10**6,
    }
    return svf_reference_source(options, pre())


def synthetic(subjects, seed: int, length: int):
    options = {
        **WARPS,
        "subjects": list(subjects),
        "val_subjects": list(LPBA_HELDOUT),
        "length": length,
        "val_length": 2 * len(LPBA_HELDOUT),
        "seed": seed,
    }
    return warp_source(options, pre())


def test_pairs(val) -> list[dict]:
    out = []
    for i in range(len(val)):
        it = val[i]
        grid = val.grid
        out.append(
            {
                "subject": it["names"][1],
                "fixed": Image(it["fixed"], grid, "S01"),
                "moving": Image(it["moving"], grid, it["names"][1]),
                "fixed_labels": Image(it["fixed_labels"], grid, "S01"),
                "moving_labels": Image(it["moving_labels"], grid, it["names"][1]),
            }
        )
    return out


def run_network(name, steps, seconds, lr, seed, subjects, cache) -> dict:
    torch.manual_seed(seed)
    method_name, config, supervised = METHODS[name]
    m = create_method(method_name, **config)
    if name == "regnet":
        train_set, _ = synthetic(subjects, seed, 10**6)
    else:
        train_set, _ = atlas_pairs(subjects, cache)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=2,
        shuffle=name != "regnet",
        collate_fn=lambda items: collate_pairs(items, train_set.grid),
        generator=torch.Generator().manual_seed(seed),
    )
    info = train_loop(m, loader, steps, seconds, lr)
    _, val = atlas_pairs(subjects, cache)
    rows = []
    for pair in test_pairs(val):
        t0 = time.perf_counter()
        with torch.no_grad():
            u = m(
                pair["fixed"].data[None], pair["moving"].data[None], pair["fixed"].grid
            ).displacement
        rows.append(
            {**scores(u, pair), "seconds": time.perf_counter() - t0, "subject": pair["subject"]}
        )
    _, warps = synthetic(subjects, seed + 1000, 1)
    wb = collate_pairs([warps[i] for i in range(len(warps))], warps.grid)
    with torch.no_grad():
        out = m(wb.fixed, wb.moving, wb.grid)
    return {
        "name": name,
        "method": method_name,
        "config": config,
        "supervised": supervised,
        "labels_in_training": name == "svf-net",
        **info,
        "epe": endpoint_error(out.displacement, wb.target).tolist(),
        "pairs": rows,
    }


def run_baselines(subjects, cache, seed) -> list[dict]:
    _, val = atlas_pairs(subjects, cache)
    identity = {"name": "identity", "pairs": [], "epe": []}
    classical = {"name": "classical default", "pairs": [], "epe": []}
    for pair in test_pairs(val):
        identity["pairs"].append({**scores(torch.zeros(1, 3, *SHAPE), pair), "seconds": 0.0})
        u, seconds = classical_displacement(pair["fixed"], pair["moving"])
        classical["pairs"].append({**scores(u, pair), "seconds": seconds})
    _, warps = synthetic(subjects, seed + 1000, 1)
    wb = collate_pairs([warps[i] for i in range(len(warps))], warps.grid)
    identity["epe"] = endpoint_error(torch.zeros_like(wb.target), wb.target).tolist()
    g = warps.grid
    for i in range(len(warps)):
        u, _ = classical_displacement(Image(wb.fixed[i], g, "f"), Image(wb.moving[i], g, "m"))
        classical["epe"].append(float(endpoint_error(u, wb.target[i : i + 1])))
    return [identity, classical]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="+", default=list(LPBA_TRAIN))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--cache", type=Path, default=OUT / "cache" / "svf-references")
    p.add_argument("--output", type=Path, default=OUT / "dense_fields_3d.json")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.run:
        print(json.dumps(run_network(a.run, a.steps, a.seconds, a.lr, a.seed, a.train, a.cache)))
        return
    t0 = time.perf_counter()
    atlas_pairs(a.train, a.cache)  # the references, once, into the cache
    reference_seconds = time.perf_counter() - t0
    results = run_baselines(a.train, a.cache, a.seed)
    args = ["--steps", str(a.steps), "--lr", str(a.lr), "--seed", str(a.seed)]
    run_networks(
        __file__, a.methods, [*args, "--cache", str(a.cache), "--train", *a.train], results
    )
    table = summary(results, "epe_vox")
    write_report(a.output, a, table, results, reference_seconds=reference_seconds)
    print_table(table, "EPE vox")


if __name__ == "__main__":
    main()
