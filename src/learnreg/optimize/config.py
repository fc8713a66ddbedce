"""Typed, YAML-friendly configuration of classical registration, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["LinearStage", "DeformableStage", "ClassicalConfig", "PRESETS", "preset"]

_METRICS = ("lncc", "ncc", "mi", "nmi", "mse")


@dataclass
class LinearStage:
    """A rigid / similarity / affine stage: shrink factors and iterations per level."""

    model: str = "affine"
    metric: str = "ncc"
    shrink: tuple[float, ...] = (8, 4)
    iterations: tuple[int, ...] = (60, 30)
    learning_rate: float = 0.01


@dataclass
class DeformableStage:
    """Stationary velocity field (diffeomorphic) stage, optimized coarse to fine.

    At each level the similarity is computed on images shrunk by ``shrink`` while the
    velocity lives on a grid shrunk by ``velocity_shrink`` (≥ ``shrink``): it is integrated
    there by scaling and squaring and its displacement upsampled, which keeps the
    diffeomorphic part cheap and smooth. ``model="displacement"`` optimizes a plain
    displacement instead (no integration, not diffeomorphic), for comparison.
    """

    model: str = "svf"
    metric: str = "lncc"
    window: int = 5
    shrink: tuple[float, ...] = (4, 2)
    velocity_shrink: tuple[float, ...] = (8, 4)
    iterations: tuple[int, ...] = (60, 30)
    learning_rate: float = 0.5
    smoothness: float = 1.0
    velocity_sigma: float = 1.0
    steps: int = 5


@dataclass
class ClassicalConfig:
    """Rigid → affine → diffeomorphic registration; any stage may be dropped."""

    linear: list[LinearStage] = field(
        default_factory=lambda: [LinearStage("rigid", shrink=(8,), iterations=(60,)), LinearStage()]
    )
    deformable: DeformableStage | None = field(default_factory=DeformableStage)
    mi_bins: int = 32
    mi_samples: int | None = 32768
    """Random voxels per MI evaluation in linear stages (None: all); deformable uses all."""

    def validate(self) -> ClassicalConfig:
        stages: list[Any] = list(self.linear) + ([self.deformable] if self.deformable else [])
        for s in stages:
            if s.metric not in _METRICS:
                raise ValueError(f"metric must be one of {_METRICS}, got {s.metric!r}")
            if len(s.shrink) != len(s.iterations) or len(
                getattr(s, "velocity_shrink", s.shrink)
            ) != len(s.shrink):
                raise ValueError(
                    f"shrink {s.shrink}, iterations {s.iterations} (and velocity_shrink) "
                    "must have equal length"
                )
        if self.deformable is not None and self.deformable.model not in ("svf", "displacement"):
            raise ValueError(
                f"deformable model must be svf or displacement, not {self.deformable.model!r}"
            )
        for s in self.linear:
            if s.model not in ("rigid", "similarity", "affine"):
                raise ValueError(
                    f"linear model must be rigid, similarity or affine, not {s.model!r}"
                )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassicalConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
        lin = [_stage(LinearStage, s) for s in d.get("linear", [])]
        deform = d.get("deformable")
        return cls(
            linear=lin,
            deformable=_stage(DeformableStage, deform) if deform else None,
            mi_bins=int(d.get("mi_bins", 32)),
            mi_samples=d.get("mi_samples", 32768),
        ).validate()


def _stage(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid: {sorted(known)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def _brain() -> ClassicalConfig:
    return ClassicalConfig()


def _multimodal() -> ClassicalConfig:
    return ClassicalConfig(
        linear=[LinearStage("rigid", "mi", (8,), (60,)), LinearStage("affine", "mi")],
        deformable=DeformableStage(metric="mi", learning_rate=0.3, smoothness=2.0),
    )


def _affine() -> ClassicalConfig:
    return ClassicalConfig(deformable=None)


def _rigid() -> ClassicalConfig:
    return ClassicalConfig(linear=[LinearStage("rigid")], deformable=None)


PRESETS = {"default": _brain, "multimodal": _multimodal, "affine": _affine, "rigid": _rigid}


def preset(name: str) -> ClassicalConfig:
    """A named preset: ``default`` (same modality, LNCC), ``multimodal`` (MI), ``affine``, ``rigid``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]().validate()
