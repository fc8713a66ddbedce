"""Real 2D brain slices for training tests: ANTs' six axial T1 slices, cropped to the head,
64×64, intensity / 255; pairs among r16, r27, r30, r62, r64 for training, r85 never trained on.
Alignment is scored by the Dice of three intensity classes (smoothed image split at the brain's
tertiles; background 0) and by LNCC, before (identity) and after warping."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from learnreg.io.images import read_image
from learnreg.losses.functional import lncc
from learnreg.methods.base import RegistrationBatch
from learnreg.metrics import mean_dice
from learnreg.spatial.differential import jacobian_determinant
from learnreg.spatial.filters import gaussian_blur
from learnreg.spatial.sampling import warp

TRAIN = ("r16", "r27", "r30", "r62", "r64")
TEST = (("r16", "r85"), ("r85", "r27"), ("r30", "r85"), ("r85", "r62"))  # (fixed, moving)


def tissue_labels(x: torch.Tensor) -> torch.Tensor:
    """0 background, 1-3 tertiles of the (σ=1 smoothed) brain intensities."""
    x = gaussian_blur(x, 1.0)
    brain = x > 0.1
    q = torch.quantile(x[brain], torch.tensor([1 / 3, 2 / 3]))
    return (brain.long() + (x >= q[0]).long() + (x >= q[1]).long()) * brain.long()


def load_slices(data_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name → (image (1, 1, 64, 64), tissue labels)``."""
    out = {}
    for name in (*TRAIN, "r85"):
        img = read_image(data_root / "ants2d" / f"{name}slice.jpg").data[None] / 255.0
        img = F.interpolate(img[..., 32:224, 32:224], size=(64, 64), mode="area")
        out[name] = (img, tissue_labels(img))
    return out


def stack(names, slices):
    """Images and labels of ``names`` as two ``(N, 1, H, W)`` batches."""
    return (torch.cat([slices[n][k] for n in names]) for k in (0, 1))


def train(method, slices, steps: int = 300, lr: float = 3e-3, batch: int = 4):
    """Minimal loop: Adam on random training pairs (labels given to the loss only)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    for _ in range(steps):
        idx = torch.randint(len(TRAIN), (batch, 2), generator=gen)
        fixed, fixed_lab = stack([TRAIN[i] for i in idx[:, 0]], slices)
        moving, moving_lab = stack([TRAIN[i] for i in idx[:, 1]], slices)
        batch_ = RegistrationBatch(fixed, moving, fixed_lab, moving_lab)
        terms = method.loss(batch_, method(batch_.fixed, batch_.moving))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    return method


def evaluate(method, slices):
    """Per held-out pair: Dice and LNCC before/after, min det J of the predicted field."""
    rows = []
    for f, m in TEST:
        (fixed, fixed_lab), (moving, moving_lab) = slices[f], slices[m]
        out = method.predict(fixed, moving)  # no labels needed
        warped_lab = warp(moving_lab, out.displacement, mode="label")
        rows.append(
            {
                "dice0": mean_dice(fixed_lab, moving_lab, [1, 2, 3]),
                "dice1": mean_dice(fixed_lab, warped_lab, [1, 2, 3]),
                "cc0": -float(lncc(fixed, moving)),
                "cc1": -float(lncc(fixed, out.warped)),
                "detj": float(jacobian_determinant(out.displacement).min()),
            }
        )
    return rows


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)
