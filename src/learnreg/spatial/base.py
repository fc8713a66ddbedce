"""The transform interface: every transform maps fixed-space world points to moving space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from learnreg.core.grid import Grid

__all__ = ["SpatialTransform", "TransformChain"]


class SpatialTransform(nn.Module):
    """A map of world points (RAS mm), fixed space to moving space (ITK's convention).

    Parameters are either the module's own (optimized classically) or supplied by a
    network's output. Subclasses implement :meth:`forward` on points ``(N, ..., D)``.
    """

    ndim: int

    def forward(self, points: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self) -> SpatialTransform:
        """The inverse transform (exact where it exists, iterative for displacement fields)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    @property
    def batch_size(self) -> int:
        """Number of transforms held (the leading dimension of the parameters)."""
        sizes = [t.shape[0] for t in list(self.parameters()) + list(self.buffers()) if t.dim()]
        return max(sizes, default=1)

    def map_grid(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """Mapped world points of every voxel of ``grid``, channels-last ``(N, *S, D)``;
        ``N`` is ``batch`` or, by default, :attr:`batch_size`."""
        n = self.batch_size if batch is None else batch
        pts = grid.world_points(torch.float32, self._device()).unsqueeze(0)
        return self(pts.expand(n, *pts.shape[1:]))

    def displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """World displacement ``T(x) - x`` in mm on ``grid``, channels-first ``(N, D, *S)``."""
        pts = grid.world_points(torch.float32, self._device()).unsqueeze(0)
        return (self.map_grid(grid, batch) - pts).movedim(-1, 1)

    def voxel_displacement(self, grid: Grid, batch: int | None = None) -> torch.Tensor:
        """``T(x) - x`` in voxel units of ``grid`` along its index axes, ``(N, D, *S)``: the
        dense field a network grid's images are warped with
        (:func:`~learnreg.spatial.sampling.warp`). Differentiable in the parameters."""
        mapped = grid.world_to_index(self.map_grid(grid, batch))
        return (mapped - grid.index_points(mapped.dtype, mapped.device)).movedim(-1, 1)

    def then(self, other: SpatialTransform) -> TransformChain:
        """``other ∘ self``: apply this transform to points first, then ``other``."""
        return TransformChain([self, other])

    def _register_tensor(self, name: str, value: torch.Tensor, learnable: bool) -> None:
        """Keep ``value`` as an optimized ``nn.Parameter`` or, when supplied (e.g. by a
        network), as a buffer that stays in the autograd graph so gradients flow to it."""
        if learnable:
            setattr(self, name, nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(name, value)

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


class TransformChain(SpatialTransform):
    """Transforms applied to points in list order: ``chain(x) = t_n(...t_2(t_1(x)))``.

    A registration result is ``[deformable on the fixed grid, affine]``: ANTs' convention
    ``x_moving = A(x + u(x))``.
    """

    def __init__(self, transforms: Sequence[SpatialTransform]) -> None:
        super().__init__()
        flat: list[SpatialTransform] = []
        for t in transforms:
            flat.extend(t.transforms if isinstance(t, TransformChain) else [t])
        if not flat:
            raise ValueError("TransformChain needs at least one transform")
        dims = {t.ndim for t in flat}
        if len(dims) != 1:
            raise ValueError(f"TransformChain mixes dimensionalities {sorted(dims)}")
        self.ndim = flat[0].ndim
        self.transforms = nn.ModuleList(flat)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            points = t(points)
        return points

    def inverse(self) -> TransformChain:
        return TransformChain([t.inverse() for t in reversed(self.transforms)])
