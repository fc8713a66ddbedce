"""Named, weighted loss terms built from a YAML-friendly spec, through the loss registry.

A *spec* names registered losses (:func:`~learnreg.losses.modules.available_losses`) with their
weights and options, in any of these forms::

    lncc                                   # one term, weight 1, default options
    [lncc, {diffusion: 0.1}]               # a list of names and one-key mappings
    {lncc: {window: 9}, mse: 0.5}          # name: options (weight 1) or name: weight
    {lncc: {window: 9, weight: 2.0}}       # options and weight together
    {fine: {loss: lncc, window: 5}, coarse: {loss: lncc, window: 15, weight: 0.5}}
                                           # two terms of one loss under their own names

``weight`` (default 1, ``>= 0``) and ``loss`` (the registry name when the key is a term name
of the user's choosing) are reserved keys; every other key is an option of the loss, checked
against its signature. A term of weight 0 is computed and reported but not counted.
:class:`LossTerms` validates names (closest names and the valid list on a typo), kinds (a
regularizer where a similarity is expected is an error naming both) and options when it is
built, and returns every term's unweighted value by name plus the weighted ``"total"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from torch import Tensor, nn

from learnreg.losses.modules import FunctionalLoss, loss_class

__all__ = ["LossSpec", "TermSpec", "LossTerms", "parse_loss_spec"]

LossSpec = str | Sequence[Any] | Mapping[str, Any] | None
"""A loss name, a list of names / one-key mappings, or a mapping ``name: weight | options``."""

RESERVED = ("weight", "loss")
"""Keys of a term's mapping that are not options of its loss."""


def _key(name: object) -> str:
    return str(name).strip().lower().replace("-", "_")


@dataclass(frozen=True)
class TermSpec:
    """One parsed term: its ``name`` (key of its value), registry ``loss``, ``weight`` and the
    ``options`` the spec gives it."""

    name: str
    loss: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where}: weight must be a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: weight must be finite and >= 0, got {value!r}")
    return w


def _term(name: object, value: object, role: str) -> TermSpec:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{role}: term names must be non-empty strings, got {name!r}")
    key = _key(name)
    where = f"{role}.{key}"
    if key == "total":
        raise ValueError(f"{role}: 'total' is reserved for the weighted sum; rename the term")
    if value is None:
        return TermSpec(key, key)
    if isinstance(value, Mapping):
        options = dict(value)
        weight = _weight(options.pop("weight", 1.0), where)
        loss = options.pop("loss", key)
        if not isinstance(loss, str):
            raise ValueError(f"{where}: loss must be a registered loss name, got {loss!r}")
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{where}: option names must be strings, got {bad}")
        return TermSpec(key, _key(loss), weight, options)
    if isinstance(value, Real) and not isinstance(value, bool):
        return TermSpec(key, key, _weight(value, where))
    raise ValueError(
        f"{where}: expected a weight (number) or a mapping of options "
        f"(e.g. {{{key}: {{weight: 1.0, ...}}}}), got {value!r}"
    )


def parse_loss_spec(spec: LossSpec, role: str = "loss") -> list[TermSpec]:
    """The terms of ``spec`` in order (see the module docstring); ``None`` is no term.

    Raises ValueError (prefixed by ``role``, e.g. ``"similarity"``) for malformed specs,
    negative weights and repeated term names. Names are not looked up here."""
    if spec is None:
        return []
    if isinstance(spec, str):
        items: list[tuple[object, object]] = [(spec, None)]
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence):
        items = []
        for item in spec:
            if isinstance(item, str):
                items.append((item, None))
            elif isinstance(item, Mapping) and len(item) == 1:
                items.extend(item.items())
            else:
                raise ValueError(
                    f"{role}: each list item must be a loss name or a one-key mapping "
                    f"{{name: weight or options}}, got {item!r}"
                )
    else:
        raise ValueError(
            f"{role}: expected a loss name, a list or a mapping of terms, got {spec!r}"
        )
    terms = [_term(name, value, role) for name, value in items]
    seen: set[str] = set()
    for t in terms:
        if t.name in seen:
            raise ValueError(
                f"{role}: term {t.name!r} is given twice; give each its own name, "
                f"e.g. {{{t.name}_2: {{loss: {t.loss}, ...}}}}"
            )
        seen.add(t.name)
    return terms


class LossTerms(nn.Module):
    """Weighted sum of named registry losses of one kind, built from a :data:`LossSpec`.

    Args:
        spec: the terms (module docstring); ``None``, ``{}`` or ``[]``: no term.
        kind: the kind every term must have (``"similarity"``, ``"label"``, ``"transform"``,
            ``"regularizer"``, ``"inverse_consistency"``, or several); None: any, but all
            terms of one kind (they are called with the same inputs).
        role: what the terms are for, prefixed to every error (default: ``kind``), e.g. the
            config key they come from.
        defaults: options given to every term whose loss accepts them, unless the registry
            entry or the spec sets them (e.g. a classical preset's MI ``bins``).

    ``forward(*inputs, **overrides)`` calls every term on ``inputs`` (as its ``kind`` is
    called, e.g. ``(fixed, warped)`` or ``(field,)``) and returns ``{name: unweighted value,
    ..., "total": Σ weight · value}``; an override (e.g. ``mask=``, ``spacing=``,
    ``reduction=``) goes to the terms whose loss accepts it. A weight of 1 is not multiplied,
    so a single unit-weight term's total is exactly the loss's value.

    Example::

        terms = LossTerms({"lncc": {"window": 5}, "mse": 0.1}, "similarity")
        out = terms(fixed, warped)      # {"lncc": ..., "mse": ..., "total": lncc + 0.1 mse}
    """

    def __init__(
        self,
        spec: LossSpec,
        kind: str | Sequence[str] | None = None,
        *,
        role: str | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.role = role or (kind if isinstance(kind, str) else "loss")
        self.specs: tuple[TermSpec, ...] = tuple(parse_loss_spec(spec, self.role))
        losses = []
        for t in self.specs:
            where = f"{self.role}.{t.name}" if t.name != t.loss else self.role
            try:
                cls, registered = loss_class(t.loss, kind)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            given = {k: v for k, v in (defaults or {}).items() if k in cls.option_names()}
            try:
                losses.append(cls(**{**given, **registered, **t.options}))
            except ValueError as e:
                raise ValueError(f"{self.role}.{t.name}: {e}") from None
        kinds = sorted({loss.kind for loss in losses})
        if len(kinds) > 1:
            raise ValueError(
                f"{self.role}: terms of different kinds ({', '.join(kinds)}) take different "
                "inputs; build one LossTerms per kind"
            )
        self.kind: str | None = kinds[0] if kinds else (kind if isinstance(kind, str) else None)
        self.losses = nn.ModuleList(losses)

    # -- container protocol
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.specs)

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every term, by name."""
        return {t.name: t.weight for t in self.specs}

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> FunctionalLoss:
        """The loss module of term ``name``."""
        if name not in self.names:
            raise KeyError(f"{self.role}: no term {name!r}; terms: {', '.join(self.names)}")
        return self.losses[self.names.index(name)]

    def to_spec(self) -> dict[str, dict[str, Any]]:
        """The terms as a canonical mapping ``{name: {weight, [loss,] options...}}`` (plain
        types, for configs and logs; the spec's own options, not the defaults)."""
        out = {}
        for t in self.specs:
            entry: dict[str, Any] = {"weight": t.weight}
            if t.loss != t.name:
                entry["loss"] = t.loss
            out[t.name] = {**entry, **t.options}
        return out

    # -- evaluation
    def forward(self, *inputs: Tensor, **overrides: Any) -> dict[str, Tensor]:
        unused = [k for k in overrides if not any(k in loss.option_names() for loss in self.losses)]
        if unused and len(self):
            raise ValueError(f"{self.role}: no term takes the option(s) {sorted(unused)}")
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for t, loss in zip(self.specs, self.losses, strict=True):
            value = loss(
                *inputs, **{k: v for k, v in overrides.items() if k in loss.option_names()}
            )
            out[t.name] = value
            if t.weight:
                weighted = value if t.weight == 1.0 else t.weight * value
                total = weighted if total is None else total + weighted
        out["total"] = inputs[0].new_zeros(()) if total is None else total
        return out

    def extra_repr(self) -> str:
        return f"role={self.role!r}, weights={self.weights}"
