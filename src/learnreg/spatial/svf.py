"""Stationary velocity fields, exponentiated by scaling and squaring (diffeomorphic)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.displacement import DisplacementField, on_grid
from learnreg.spatial.fields import check_field
from learnreg.spatial.sampling import Padding, warp

__all__ = ["StationaryVelocityField", "integrate_velocity"]


CHECKPOINT_MIN = 1 << 22
"""Values of a velocity (batch × channels × voxels) from which integration checkpoints."""


def integrate_velocity(
    velocity: torch.Tensor, steps: int = 7, padding: Padding = "border"
) -> torch.Tensor:
    """Displacement ``exp(v) - id`` of a stationary velocity ``(N, D, *S)`` (voxel units).

    Scaling and squaring: ``u = v / 2**steps``, then ``steps`` times ``u ← u + u∘(id + u)``
    (:func:`~learnreg.spatial.fields.compose_displacements` of ``u`` with itself, the sum
    taken in place in the freshly sampled field). The field is extended by its border
    values outside the grid (``padding``).

    Under autograd, for fields of at least :data:`CHECKPOINT_MIN` values, the squarings are
    recomputed during the backward pass (activation checkpointing): the graph keeps one field
    instead of two per step (at 160×192×160, ~0.8 GB less for 5 steps) for ``steps`` extra
    samplings. Values and gradients are unchanged. Smaller fields skip it: its first use
    imports ``torch._dynamo`` (0.7 s), more than a classical registration's velocity saves.
    """
    check_field(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"integrate_velocity: steps must be >= 0, got {steps}")
    u = velocity / 2**steps
    if steps and u.requires_grad and torch.is_grad_enabled() and u.numel() >= CHECKPOINT_MIN:
        return checkpoint(_square, u, steps, padding, use_reentrant=False)
    return _square(u, steps, padding)


def _square(u: torch.Tensor, steps: int, padding: Padding) -> torch.Tensor:
    for _ in range(steps):
        u = warp(u, u, "linear", padding).add_(u)
    return u


class StationaryVelocityField(SpatialTransform):
    """``exp(v)`` for a velocity ``v (N, D, *S)`` in voxel units of ``grid``.

    Points map through the exponentiated displacement (zero outside the grid, like
    :class:`DisplacementField`); :meth:`inverse` is ``exp(-v)``.
    """

    def __init__(
        self,
        grid: Grid,
        velocity: torch.Tensor | None = None,
        steps: int = 7,
        learnable: bool = False,
        batch: int = 1,
    ) -> None:
        super().__init__()
        if velocity is None:
            velocity = torch.zeros(batch, grid.ndim, *grid.shape)
        check_field(velocity, "velocity")
        if velocity.shape[1] != grid.ndim or tuple(velocity.shape[2:]) != grid.shape:
            raise ValueError(
                f"velocity must be (N, {grid.ndim}, *{grid.shape}); got {tuple(velocity.shape)}"
            )
        self.grid = grid
        self.ndim = grid.ndim
        self.steps = int(steps)
        self._register_tensor("velocity", velocity, learnable)

    def exp(self) -> torch.Tensor:
        """The displacement ``exp(v) - id`` in voxel units of :attr:`grid`, ``(N, D, *S)``."""
        return integrate_velocity(self.velocity, self.steps)

    def displacement_field(self) -> DisplacementField:
        return DisplacementField(self.grid, self.exp())

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """``exp(v) - id`` integrated on the velocity's grid, then expressed on ``grid``."""
        return on_grid(self.grid, self.exp(), grid, batch, super().voxel_displacement)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.displacement_field()(points)

    def inverse(self) -> StationaryVelocityField:
        """``exp(-v)``: exact up to the integration error."""
        return StationaryVelocityField(self.grid, -self.velocity, self.steps)
