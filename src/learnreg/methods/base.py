"""The method interface the trainer and evaluation code rely on.

A method is ``network(fixed, moving) → transform`` plus its loss: :meth:`RegistrationMethod.
forward` returns a :class:`MethodOutput` (a dense fixed→moving displacement in voxel units of
the network grid, the warped moving image and method-specific extras) and
:meth:`RegistrationMethod.loss` turns a batch and that output into named loss terms, one of
them ``"total"``. Training code never looks at a method's name.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["RegistrationBatch", "MethodOutput", "RegistrationMethod"]


def _move(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


@dataclass
class RegistrationBatch:
    """What datasets yield, collated: images ``(N, 1, *S)`` on the network grid.

    ``fixed_labels`` / ``moving_labels`` are optional ``(N, 1, *S)`` int64 label maps used for
    weak supervision or validation only. ``target`` is the known answer of supervised
    methods (e.g. the parameters or control-point displacements of the transform that made
    ``moving`` from ``fixed``), ``(N, ...)`` in a layout the method defines.
    """

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    target: Tensor | None = None

    def to(self, device: torch.device | str) -> RegistrationBatch:
        return type(self)(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class MethodOutput:
    """A method's prediction for a batch.

    ``displacement``: ``(N, D, *S)`` fixed→moving in voxel units of the network grid;
    ``warped``: the moving image warped onto the fixed grid ``(N, 1, *S)``; ``velocity``: the
    stationary velocity before integration (on its own, possibly coarser, grid) when the
    transform is one; ``extras``: method-specific tensors (e.g. ``"mean"``, ``"log_variance"``,
    ``"backward_displacement"``, ``"warped_fixed"``).
    """

    displacement: Tensor
    warped: Tensor
    velocity: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> MethodOutput:
        return type(self)(
            self.displacement.to(device),
            self.warped.to(device),
            None if self.velocity is None else self.velocity.to(device),
            _move(self.extras, device),
        )

    def detach(self) -> MethodOutput:
        def d(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.detach()
            return {k: d(v) for k, v in x.items()} if isinstance(x, dict) else x

        return type(self)(
            self.displacement.detach(), self.warped.detach(), d(self.velocity), d(self.extras)
        )


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

    def forward(self, fixed: Tensor, moving: Tensor) -> MethodOutput:  # pragma: no cover
        raise NotImplementedError

    def loss(self, batch: RegistrationBatch, output: MethodOutput) -> dict[str, Tensor]:
        """Named loss terms for ``batch`` and its ``output``; must contain ``"total"``."""
        raise NotImplementedError  # pragma: no cover

    def inverse_displacement(self, output: MethodOutput) -> Tensor:
        """The displacement undoing ``output.displacement`` (moving→fixed), on the same grid.

        Default: the ``"backward_displacement"`` extra when the method made one, else
        iterative inversion; methods predicting a velocity override it with ``exp(−v)``.
        """
        if "backward_displacement" in output.extras:
            return output.extras["backward_displacement"]
        from learnreg.spatial.fields import invert_displacement

        return invert_displacement(output.displacement, 50, 1e-3, "border").displacement

    @torch.no_grad()
    def predict(self, fixed: Tensor, moving: Tensor) -> MethodOutput:
        """Eval-mode forward without gradients (no sampling noise); restores the mode."""
        was_training = self.training
        self.eval()
        try:
            return self(fixed, moving)
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        cfg = getattr(self, "config", {})
        return ", ".join(f"{k}={v!r}" for k, v in cfg.items())
