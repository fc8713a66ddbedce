"""The method interface the trainer, prediction and evaluation code rely on.

A method is ``network(fixed, moving) → transform`` plus its loss. :meth:`RegistrationMethod.
forward` takes a pair on a network grid (:class:`~learnreg.core.Grid`, placed in world space;
without one, the unit grid whose world coordinates are the voxel indices) and returns a
:class:`MethodOutput` whose ``transform`` is one of the :mod:`learnreg.spatial` transforms —
an affine as a matrix, a B-spline as control points, a velocity as a velocity — mapping fixed
world points to moving world points, built from the network's output the way classical
optimization builds it from its parameters. The dense displacement on the grid and the warped
moving image are derived from that transform. :meth:`RegistrationMethod.loss` turns a batch
and an output into named loss terms, one of them ``"total"``; :meth:`RegistrationMethod.
validate` scores a validation batch. Training code never looks at a method's name, nor at its
kind of transform or supervision.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from learnreg.core.grid import Grid
from learnreg.spatial.base import SpatialTransform
from learnreg.spatial.projection import ProjectionGeometry
from learnreg.spatial.sampling import warp

__all__ = ["RegistrationBatch", "MethodOutput", "RegistrationMethod", "unit_grid"]


def _move(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor | nn.Module):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def unit_grid(images: Tensor) -> Grid:
    """The grid of a batch ``(N, C, *S)`` given without one: unit spacing at the origin, so
    world coordinates are voxel indices."""
    return Grid(tuple(int(s) for s in images.shape[2:]))


@dataclass
class RegistrationBatch:
    """What datasets yield, collated: images ``(N, 1, *S)`` on the network grid ``grid``.

    ``fixed_labels`` / ``moving_labels`` are optional ``(N, 1, *S)`` int64 label maps (or
    float masks ``(N, L, *S)``) used for weak supervision or validation only. ``target`` is
    the known answer of supervised methods (e.g. the parameters or control-point
    displacements of the transform that made ``moving`` from ``fixed``), ``(N, ...)`` in a
    layout the method defines, in index coordinates of the grid. ``grid`` places the images in
    world space (``None``: :func:`unit_grid`).
    """

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    target: Tensor | None = None
    grid: Grid | None = None

    def to(self, device: torch.device | str) -> RegistrationBatch:
        return type(self)(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    @property
    def network_grid(self) -> Grid:
        """:attr:`grid`, or the unit grid of the images."""
        return self.grid if self.grid is not None else unit_grid(self.fixed)


def dense_target(
    batch: RegistrationBatch,
    ndim: int,
    method: str,
    what: str = "the true dense displacement",
    source: str = "data.synthetic: {kind: warp, transform: dense}",
) -> Tensor:
    """``batch.target`` as a dense field ``(N, D, *S)`` on the batch's grid (voxels), in the
    fixed image's dtype; a ValueError naming ``method``, ``what`` supervises it and a data
    ``source`` that provides it when the batch has none or another shape."""
    t, f = batch.target, batch.fixed
    want = (f.shape[0], ndim, *f.shape[2:])
    if t is None or tuple(t.shape) != want:
        got = "none" if t is None else tuple(t.shape)
        raise ValueError(
            f"{method}: supervised by {what}; the batch needs target {want} (e.g. {source}), "
            f"got {got}"
        )
    return t.to(f.dtype)


class MethodOutput:
    """A method's prediction for a batch: the transform, and what is derived from it.

    Attributes:
        transform: fixed world → moving world (batch ``N``).
        grid: the network grid the pair was given on.
        displacement: ``transform``'s displacement on ``grid`` in its voxel units,
            ``(N, D, *S)`` (``transform.voxel_displacement(grid)``).
        warped: the moving image warped by it onto ``grid`` ``(N, C, *S)`` (when ``moving``
            was given).
        extras: method-specific tensors (parameters, intermediate warps, ...).
    """

    def __init__(
        self,
        transform: SpatialTransform,
        grid: Grid,
        moving: Tensor | None = None,
        extras: dict | None = None,
    ) -> None:
        self.transform = transform
        self.grid = grid
        self.extras = dict(extras or {})
        self.displacement = transform.voxel_displacement(grid)
        self.warped = None if moving is None else warp(moving, self.displacement)

    def inverse_displacement(self) -> Tensor:
        """The displacement of the inverse transform on :attr:`grid` (voxel units): exact for
        velocity fields and matrices, iterative for dense fields."""
        return self.transform.inverse().voxel_displacement(self.grid)


class RegistrationMethod(nn.Module):
    """Base of all learned registration methods.

    Subclasses implement :meth:`forward` and :meth:`loss`. :attr:`config` is filled
    automatically with the resolved keyword arguments of the subclass constructor (defaults
    included; a constructor may overwrite entries with values it resolves itself), so
    ``type(m)(**m.config)`` rebuilds the same architecture. :attr:`name` is set by
    :func:`learnreg.methods.registry.register_method`.
    """

    name: ClassVar[str] = ""
    config: dict

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        sig = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self: RegistrationMethod, *args: Any, **kw: Any) -> None:
            bound = sig.bind(self, *args, **kw)
            bound.apply_defaults()
            depth = getattr(self, "_init_depth", 0)
            object.__setattr__(self, "_init_depth", depth + 1)
            try:
                init(self, *args, **kw)
            finally:
                object.__setattr__(self, "_init_depth", depth)
            if depth == 0:  # outermost constructor: its arguments are the config
                resolved = getattr(self, "_resolved", {})
                cfg = {k: v for k, v in list(bound.arguments.items())[1:]}
                self.config = {**cfg, **{k: v for k, v in resolved.items() if k in cfg}}

        cls.__init__ = wrapped  # type: ignore[method-assign]

    def resolve(self, **values: Any) -> None:
        """Record constructor arguments whose default (e.g. None) was resolved to a value."""
        object.__setattr__(self, "_resolved", {**getattr(self, "_resolved", {}), **values})

    # -- what every method defines
    def forward(
        self, fixed: Tensor, moving: Tensor, grid: Grid | None = None
    ) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """Named loss terms for ``batch`` and its ``output``; must contain ``"total"``.

        Methods with several parameter groups (:meth:`parameter_groups`) return one total per
        group: ``"total"`` for the first and ``"total_<group>"`` for each other."""
        raise NotImplementedError  # pragma: no cover

    # -- what the trainer and prediction ask, with defaults
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The network grid size a fixed-size network needs (e.g. a fully connected head),
        or None when any size (multiple of :attr:`size_multiple`) is fine."""
        return None

    @property
    def size_multiple(self) -> int:
        """Grid sizes must be multiples of this (``2**levels`` for a U-Net)."""
        return 1

    learned: ClassVar[bool] = True
    """False for a method without trained weights (e.g. DeepFlow's matching and variational
    flow): ``learnreg register --method NAME`` runs it without a checkpoint and ``learnreg
    train`` refuses it."""

    projection: ClassVar[bool] = False
    """True for a 2D/3D method: ``fixed`` is an X-ray ``(N, 1, *detector)``, a projection of
    the ``moving`` volume (on the grid) by :meth:`projection_geometry`, and the transform is the
    volume's 3D pose (imaging-system world → volume world). Its training data pair X-rays with
    volumes (``data.synthetic: {kind: drr}``) and ``learnreg register`` takes a 2D fixed
    image with a 3D moving one."""

    def projection_geometry(self, grid: Grid) -> ProjectionGeometry:
        """The imaging system of a :attr:`projection` method for volumes on ``grid``."""
        raise NotImplementedError(f"{self.name or type(self).__name__} is not a 2D/3D method")

    init_methods: ClassVar[tuple[str, ...]] = ()
    """Other methods whose checkpoints may start this one's training (``init:``), e.g. an
    adversarial variant starting from the plain method's first stage; :meth:`initial_state`
    maps their weights."""

    group_modules: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Parameter groups beyond the main one: group name → attribute names of the submodules
    it trains (e.g. ``{"discriminator": ("discriminator",)}`` for an adversarial method);
    every other trainable parameter is in ``"model"``."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters trained by separate optimizers, by name (first: the main group,
        ``"model"``; then those of :attr:`group_modules`)."""
        groups: dict[str, list[nn.Parameter]] = {}
        taken: set[int] = set()
        for name, attrs in self.group_modules.items():
            params = [p for a in attrs for p in getattr(self, a).parameters() if p.requires_grad]
            groups[name] = params
            taken |= {id(p) for p in params}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return {"model": main, **groups}

    def initial_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weights to start training from, given those of an ``init`` checkpoint of this
        method (fine-tuning, or the next stage of a staged recipe). Default: the checkpoint's
        own, which must fit the network exactly; a method whose stages are different
        architectures (e.g. a global network, then global + local) fills in what the
        checkpoint lacks."""
        return state

    def transform_error(self, batch: RegistrationBatch, output: MethodOutput) -> Tensor:
        """Per-pair error ``(N,)`` of the prediction against ``batch.target`` (supervised
        methods: corner, grid or control-point error in voxels, ...)."""
        raise NotImplementedError(f"{self.name or type(self).__name__} has no transform error")

    @torch.no_grad()
    def validate(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, float]:
        """Validation measures of one batch (means over its pairs).

        Default: ``"dice"`` (mean over labels of the label-warped moving labels against the
        fixed labels, higher is better) when the batch has label maps; else ``"error"``
        (:meth:`transform_error`, lower is better) when it has a ``target``; else ``"loss"``
        (the method's similarity term, or its total loss, lower is better). The trainer keeps
        the checkpoint that is best by the first of these keys present.
        """
        if (
            batch.fixed_labels is not None
            and batch.moving_labels is not None
            and not batch.fixed_labels.is_floating_point()
        ):
            from learnreg.metrics.score import score_result
            from learnreg.spatial.displacement import DisplacementField
            from learnreg.spatial.result import RegistrationResult

            grid = output.grid
            dice, identity = [], []
            for i in range(batch.fixed_labels.shape[0]):
                # the prediction as a registration result on the network grid, scored by the
                # same function as `learnreg register` and `learnreg evaluate`
                field = DisplacementField(grid, output.displacement[i : i + 1].float())
                for scores, result in (
                    (dice, RegistrationResult(grid, grid, deformable=field)),
                    (identity, RegistrationResult(grid, grid)),
                ):
                    d = score_result(
                        result,
                        fixed_labels=batch.fixed_labels[i],
                        moving_labels=batch.moving_labels[i],
                        metrics=("dice",),
                    )["dice_mean"]
                    scores.append(float("nan") if d is None else d)
            return {"dice": sum(dice) / len(dice), "identity_dice": sum(identity) / len(identity)}
        if batch.target is not None:
            try:
                return {"error": float(self.transform_error(batch, output).float().mean())}
            except NotImplementedError:
                pass
        terms = self.loss(batch, output)
        return {"loss": float(terms.get("similarity", terms["total"]))}

    @torch.no_grad()
    def predict(self, fixed: Tensor, moving: Tensor, grid: Grid | None = None) -> MethodOutput:
        """Eval-mode forward without gradients (no sampling noise); restores the mode."""
        was_training = self.training
        self.eval()
        try:
            return self(fixed, moving, grid)
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        cfg = getattr(self, "config", {})
        return ", ".join(f"{k}={v!r}" for k, v in cfg.items())
