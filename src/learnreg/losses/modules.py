"""``nn.Module`` wrappers of :mod:`learnreg.losses.functional` and a name registry.

Each wrapper stores the functional's keyword options (validated at construction) and calls
it in ``forward``; options can also be overridden per call. ``kind`` tells generic code how
to call it: ``"similarity"`` (fixed, moving[, mask]), ``"label"`` (fixed_labels,
moving_labels), ``"transform"`` (pred, target), ``"regularizer"`` (field[, spacing]) or
``"inverse_consistency"`` (forward_disp, backward_disp).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from learnreg.core.options import check_option
from learnreg.losses import functional as LF

__all__ = [
    "FunctionalLoss",
    "NCCLoss",
    "LNCCLoss",
    "MSELoss",
    "L1Loss",
    "MILoss",
    "SSIMLoss",
    "DiceLoss",
    "MultiScaleDiceLoss",
    "ParameterMSELoss",
    "GridPointDistanceLoss",
    "FieldL1Loss",
    "FieldL2Loss",
    "DiffusionRegularizer",
    "BendingEnergyRegularizer",
    "TotalVariationRegularizer",
    "FoldingRegularizer",
    "InverseConsistencyLoss",
    "KINDS",
    "register_loss",
    "create_loss",
    "available_losses",
    "loss_class",
]

KINDS = ("similarity", "label", "transform", "regularizer", "inverse_consistency")
"""The values of :attr:`FunctionalLoss.kind` (how generic code calls a loss)."""

_REGISTRY: dict[str, tuple[type[FunctionalLoss], dict[str, Any]]] = {}


class FunctionalLoss(nn.Module):
    """Base of the wrappers: ``forward(*inputs, **overrides) = function(*inputs, **options)``."""

    function: ClassVar[Callable[..., Tensor]]
    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.function).parameters.values()
        cls._options = {p.name: p for p in params if p.default is not inspect.Parameter.empty}
        cls.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in cls._options.values()]
        )
        cls.__doc__ = cls.__doc__ or f"Module form of :func:`{cls.function.__name__}`."

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self._options))
        if unknown:
            close = difflib.get_close_matches(unknown[0], self._options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{type(self).__name__}: unknown option(s) {unknown}; "
                f"valid: {sorted(self._options)}{hint}"
            )
        for name, valid in LF.CHOICES.items():
            if name in options:
                check_option(name, options[name], valid)
        self.options = options

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword options of the wrapped function (what ``__init__`` accepts)."""
        return tuple(cls._options)

    def forward(self, *inputs: Tensor, **overrides: Any) -> Tensor:
        return type(self).function(*inputs, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))


def register_loss(*names: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: make ``create_loss(name)`` build the class (with ``defaults``).

    The class must set ``kind`` to one of :data:`KINDS`; names are lower case."""

    def deco(cls: type[FunctionalLoss]) -> type[FunctionalLoss]:
        check_option(f"{cls.__name__}.kind", getattr(cls, "kind", None), KINDS)
        for name in names:
            key = name.lower().replace("-", "_")
            if key in _REGISTRY:
                raise ValueError(f"loss name {name!r} is already registered")
            _REGISTRY[key] = (cls, defaults)
        return cls

    return deco


def _kinds(kind: str | Sequence[str] | None) -> tuple[str, ...]:
    kinds = KINDS if kind is None else (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        check_option("kind", k, KINDS)
    return kinds


def available_losses(kind: str | Sequence[str] | None = None) -> list[str]:
    """All registered names and aliases (of losses of ``kind``, one or several), sorted."""
    kinds = _kinds(kind)
    return sorted(name for name, (cls, _) in _REGISTRY.items() if cls.kind in kinds)


def loss_class(
    name: str, kind: str | Sequence[str] | None = None
) -> tuple[type[FunctionalLoss], dict[str, Any]]:
    """The class and registered default options of loss ``name`` (case-insensitive, ``-`` as
    ``_``). Raises ValueError for an unknown name (closest names and the valid list, of
    ``kind`` when given) and for a loss of another kind (naming both kinds)."""
    kinds = _kinds(kind)
    what = "/".join(kinds) + " " if kind is not None else ""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        valid = available_losses(kinds)
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        names = "names" if kind is None else f"{what}losses"
        raise ValueError(f"unknown loss {name!r}{hint}; valid {names}: {', '.join(valid)}")
    cls, defaults = _REGISTRY[key]
    if cls.kind not in kinds:
        raise ValueError(
            f"{name!r} is a {cls.kind} loss, not a {'/'.join(kinds)} loss; valid {what}"
            f"losses: {', '.join(available_losses(kinds))}"
        )
    return cls, dict(defaults)


def create_loss(name: str, **options: Any) -> FunctionalLoss:
    """Build a loss module by (case-insensitive) name or alias, e.g. ``create_loss("cc", window=5)``."""
    cls, defaults = loss_class(name)
    return cls(**{**defaults, **options})


@register_loss("ncc", "gncc")
class NCCLoss(FunctionalLoss):
    function = staticmethod(LF.ncc)
    kind = "similarity"


@register_loss("lncc", "cc", "lcc", "local_ncc")
class LNCCLoss(FunctionalLoss):
    function = staticmethod(LF.lncc)
    kind = "similarity"


@register_loss("mse", "ssd")
class MSELoss(FunctionalLoss):
    function = staticmethod(LF.mse)
    kind = "similarity"


@register_loss("l1", "mae")
class L1Loss(FunctionalLoss):
    function = staticmethod(LF.l1)
    kind = "similarity"


@register_loss("nmi", normalized=True)
@register_loss("mi", "mutual_information")
class MILoss(FunctionalLoss):
    function = staticmethod(LF.mutual_information)
    kind = "similarity"


@register_loss("ssim")
class SSIMLoss(FunctionalLoss):
    function = staticmethod(LF.ssim)
    kind = "similarity"


@register_loss("dice")
class DiceLoss(FunctionalLoss):
    function = staticmethod(LF.dice)
    kind = "label"


@register_loss("msdice", "multiscale_dice")
class MultiScaleDiceLoss(FunctionalLoss):
    function = staticmethod(LF.multiscale_dice)
    kind = "label"


@register_loss("parameter_mse", "param_mse")
class ParameterMSELoss(FunctionalLoss):
    function = staticmethod(LF.parameter_mse)
    kind = "transform"


@register_loss("grid_point_distance", "gpd")
class GridPointDistanceLoss(FunctionalLoss):
    function = staticmethod(LF.grid_point_distance)
    kind = "transform"


@register_loss("field_l1")
class FieldL1Loss(FunctionalLoss):
    function = staticmethod(LF.field_l1)
    kind = "transform"


@register_loss("field_l2", "epe")
class FieldL2Loss(FunctionalLoss):
    function = staticmethod(LF.field_l2)
    kind = "transform"


@register_loss("diffusion", "grad", "grad_l2")
class DiffusionRegularizer(FunctionalLoss):
    function = staticmethod(LF.diffusion)
    kind = "regularizer"


@register_loss("bending", "bending_energy", "be")
class BendingEnergyRegularizer(FunctionalLoss):
    function = staticmethod(LF.bending_energy)
    kind = "regularizer"


@register_loss("tv", "total_variation", "grad_l1")
class TotalVariationRegularizer(FunctionalLoss):
    function = staticmethod(LF.total_variation)
    kind = "regularizer"


@register_loss("folding", "folding_penalty")
class FoldingRegularizer(FunctionalLoss):
    function = staticmethod(LF.folding_penalty)
    kind = "regularizer"


@register_loss("ic", "inverse_consistency")
class InverseConsistencyLoss(FunctionalLoss):
    function = staticmethod(LF.inverse_consistency)
    kind = "inverse_consistency"
