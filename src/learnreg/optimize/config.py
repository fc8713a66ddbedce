"""Typed, YAML-friendly configuration of classical registration, with named presets.

Each stage declares its loss terms by name through the loss registry
(:mod:`learnreg.losses.terms`): ``metric`` is the similarity (a registered similarity loss by
name, or a spec of named weighted terms) and a deformable stage's ``regularization`` the
regularizers of its velocity. A YAML config for ``learnreg register --config``::

    linear:
      - {model: rigid, metric: ncc, shrink: [8], iterations: [60]}
      - {model: affine, metric: {mi: {bins: 48}}}
    deformable:
      metric: {lncc: {window: 5}}        # or: metric: lncc (window: 5, the stage's default)
      regularization: {diffusion: 1.0}   # or several: {diffusion: 0.5, bending: 0.1}
      shrink: [4, 2]
      iterations: [60, 30]
"""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from learnreg.core.options import check_option
from learnreg.losses.terms import LossSpec, LossTerms
from learnreg.spatial.lddmm import DEFAULT_KERNEL

__all__ = [
    "LinearStage",
    "DeformableStage",
    "ClassicalConfig",
    "PRESETS",
    "DEFAULT_KERNEL",
    "preset",
    "similarity_terms",
    "regularization_terms",
    "is_multimodal",
]

LINEAR_MODELS = ("rigid", "similarity", "affine")
DEFORMABLE_MODELS = ("svf", "displacement", "lddmm")
INITS = ("com", "search")
_DEFAULT_REGULARIZATION = {"diffusion": 1.0}


@dataclass
class LinearStage:
    """A rigid / similarity / affine stage: shrink factors and iterations per level.

    ``metric``: the similarity, a registered similarity loss by name (``"ncc"``, ``"mi"``,
    ``"lncc"``, ...) or a spec of named weighted terms (``{"mi": {"bins": 48}}``); MI terms
    take the config's ``mi_bins`` and ``mi_samples`` unless the spec sets them.
    """

    model: str = "affine"
    metric: LossSpec = "ncc"
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
    ``model="lddmm"`` optimizes the initial momentum of a geodesic instead
    (:class:`~learnreg.spatial.lddmm.GeodesicShooting`: EPDiff shooting over ``steps`` time
    steps, ``L = (−α∇² + γ)^c`` with ``kernel = {alpha (mm²), gamma, power}``), regularized by
    its geodesic energy ``⟨m, K m⟩`` weighted by ``energy_weight`` (``regularization`` and
    ``velocity_sigma`` do not apply: ``K`` smooths).

    Loss = ``metric`` (as :class:`LinearStage`'s; ``window`` is the window of windowed
    metrics — LNCC, SSIM — unless the spec sets one; MI takes the config's ``mi_bins`` and all
    voxels) + ``regularization`` of the velocity (registered regularizers by name and weight;
    default ``{"diffusion": 1.0}``). ``smoothness=s`` is accepted as the older spelling of
    ``regularization={"diffusion": s}``.
    """

    model: str = "svf"
    metric: LossSpec = "lncc"
    window: int = 5
    shrink: tuple[float, ...] = (4, 2)
    velocity_shrink: tuple[float, ...] = (8, 4)
    iterations: tuple[int, ...] = (60, 30)
    learning_rate: float = 0.5
    regularization: LossSpec = field(default_factory=lambda: dict(_DEFAULT_REGULARIZATION))
    velocity_sigma: float = 1.0
    steps: int = 5
    kernel: dict = field(default_factory=lambda: dict(DEFAULT_KERNEL))
    energy_weight: float = 1.0
    smoothness: InitVar[float | None] = None

    def __post_init__(self, smoothness: float | None) -> None:
        if smoothness is None:
            return
        if self.regularization != _DEFAULT_REGULARIZATION:
            raise ValueError(
                "give regularization or smoothness (= regularization: {diffusion: smoothness}), "
                "not both"
            )
        self.regularization = {"diffusion": smoothness}


def similarity_terms(
    stage: LinearStage | DeformableStage, config: ClassicalConfig, role: str = "metric"
) -> LossTerms:
    """The similarity terms of ``stage`` (its ``metric``) with the config's defaults: MI
    ``bins`` (and ``samples`` in linear stages), the deformable stage's ``window``."""
    defaults: dict[str, Any] = {"bins": config.mi_bins}
    if isinstance(stage, DeformableStage):
        defaults["window"] = stage.window
    else:
        defaults["samples"] = config.mi_samples
    return LossTerms(stage.metric, "similarity", role=role, defaults=defaults)


def regularization_terms(stage: DeformableStage, role: str = "regularization") -> LossTerms:
    """The regularizers of the deformable stage's velocity (voxel units of its grid)."""
    return LossTerms(stage.regularization, "regularizer", role=role)


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
    init: str = "com"
    """Start of the linear stages: ``com`` (centres of mass aligned) or ``search`` (also the
    best of a coarse grid of rotations about them, as ANTs' antsAI;
    :mod:`learnreg.optimize.initialize`)."""

    def validate(self) -> ClassicalConfig:
        stages: list[tuple[str, Any]] = [(f"linear[{i}]", s) for i, s in enumerate(self.linear)]
        if self.deformable is not None:
            stages.append(("deformable", self.deformable))
        for where, s in stages:
            # building the terms checks names, kinds and options
            if not len(similarity_terms(s, self, f"{where}.metric")):
                raise ValueError(f"{where}.metric: no similarity term given")
            if isinstance(s, DeformableStage):
                regularization_terms(s, f"{where}.regularization")
            if len(s.shrink) != len(s.iterations) or len(
                getattr(s, "velocity_shrink", s.shrink)
            ) != len(s.shrink):
                raise ValueError(
                    f"shrink {s.shrink}, iterations {s.iterations} (and velocity_shrink) "
                    "must have equal length"
                )
        check_option("init", self.init, INITS)
        if self.deformable is not None:
            d = self.deformable
            check_option("deformable model", d.model, DEFORMABLE_MODELS)
            unknown = set(d.kernel) - set(DEFAULT_KERNEL)
            if unknown:
                raise ValueError(
                    f"deformable.kernel: unknown keys {sorted(unknown)}; valid: "
                    f"{sorted(DEFAULT_KERNEL)}"
                )
            if d.model == "lddmm" and d.regularization != _DEFAULT_REGULARIZATION:
                raise ValueError(
                    "deformable model lddmm is regularized by its geodesic energy: set "
                    "energy_weight (and kernel), not regularization"
                )
            if d.energy_weight < 0 or d.steps < 1:
                raise ValueError(
                    f"deformable: energy_weight must be >= 0 and steps >= 1, got "
                    f"{d.energy_weight}, {d.steps}"
                )
        for s in self.linear:
            check_option("linear model", s.model, LINEAR_MODELS)
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
            init=str(d.get("init", "com")),
        ).validate()


def _stage(cls, d: dict):
    known = {f.name for f in fields(cls)} | ({"smoothness"} if cls is DeformableStage else set())
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
        deformable=DeformableStage(
            metric="mi", learning_rate=0.3, regularization={"diffusion": 2.0}
        ),
    )


def _lddmm() -> ClassicalConfig:
    # geodesic shooting optimized over the initial momentum. Chosen on LPBA40 training
    # subjects S11, S12 → S01 (label Dice after the affine → after): at 2 mm the kernel
    # α = 100 mm² (a 10 mm length) gives 0.609 → 0.652 and 0.615 → 0.690 in 21–24 s (one
    # core), α = 25: 0.652 on S11 with forward/backward maps less consistent, α = 400:
    # 0.646 and 0.677; the default SVF stage: 0.655 and 0.695 in 4–5 s. Momentum grids of
    # 1/8 then 1/4 of the image, 5 time steps.
    return ClassicalConfig(
        deformable=DeformableStage(
            model="lddmm",
            steps=5,
            kernel={"alpha": 100.0, "gamma": 1.0, "power": 2},
            energy_weight=0.01,
            learning_rate=0.2,
        )
    )


def _affine() -> ClassicalConfig:
    # one affine stage, 80 iterations at 1/8 and 20 at 1/4: the same label Dice as the
    # default's rigid → affine stages (0.6309 vs 0.6309 on LPBA40 S11–S16 → S01) in 0.5 s
    # instead of 0.6 s for a 1 mm brain pair on two cores
    return ClassicalConfig(linear=[LinearStage(iterations=(80, 20))], deformable=None)


def _rigid() -> ClassicalConfig:
    return ClassicalConfig(linear=[LinearStage("rigid")], deformable=None)


PRESETS = {
    "default": _brain,
    "multimodal": _multimodal,
    "lddmm": _lddmm,
    "affine": _affine,
    "rigid": _rigid,
}


def preset(name: str) -> ClassicalConfig:
    """A named preset: ``default`` (same modality, LNCC, SVF), ``multimodal`` (MI), ``lddmm``
    (LNCC, geodesic shooting), ``affine``, ``rigid``."""
    check_option("preset", name, sorted(PRESETS))
    return PRESETS[name]().validate()


_MULTIMODAL_METRICS = {"mi", "nmi", "mutual_information"}


def is_multimodal(config: ClassicalConfig | dict | None) -> bool:
    """Whether a classical configuration (or its ``to_dict``) measures similarity by mutual
    information anywhere — the images' intensities are then not comparable."""
    if config is None:
        return False
    d = config.to_dict() if isinstance(config, ClassicalConfig) else config
    stages = list(d.get("linear") or []) + ([d["deformable"]] if d.get("deformable") else [])
    for stage in stages:
        metric = stage.get("metric")
        names = {metric} if isinstance(metric, str) else set(metric or {})
        if names & _MULTIMODAL_METRICS:
            return True
    return False
