"""Typed training configuration, read from YAML with ``key.sub=value`` overrides.

Example (all keys except ``method`` and the data sources have defaults)::

    method: voxelmorph
    method_config: {ndim: 3}
    data:
      images: ../shared/data/lpba40/images
      labels: ../shared/data/lpba40/labels
      atlas: S01                 # atlas-to-subject; omit for subject-to-subject pairs
      train: [S11, S12, S13]
      val: [S35, S36]
      shape: [40, 48, 40]
      levels: 3
      augment: {rotation: 5, scale: 0.05, elastic: 1.0}
    optimizer: {name: adam, lr: 1.0e-4, schedule: cosine}   # constant | cosine | linear
    init: lpba40-vxm-svf         # optional: start from a checkpoint or shipped model
    steps: 1000
    batch_size: 1
    val_every: 100
    checkpoint_every: 100
    seed: 0
    output: runs/vxm
    device: auto

Unknown keys raise :class:`~learnreg.core.errors.InputError` listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from learnreg.core.device import check_device_name
from learnreg.core.errors import InputError
from learnreg.core.options import check_option
from learnreg.data.augment import AugmentConfig

__all__ = ["DataConfig", "OptimizerConfig", "TrainConfig", "parse_override"]

_OPTIMIZERS = ("adam", "adamw", "sgd")
_ORIENTATIONS = ("RAS", "native")
_PREALIGN = (None, "rigid", "affine")
_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class DataConfig:
    """Where pairs come from and how they are put on the network grid.

    Either ``images`` (+ optional ``labels``) folders with ``train``/``val`` subject lists
    (default: all images for training, none for validation) and an optional ``atlas``
    (atlas-to-subject; without it every ordered pair of training subjects), or ``train_csv``
    (+ ``val_csv``) files of pairs, or ``synthetic`` known-warp pairs of real images. Relative paths are relative to the YAML file.
    ``prealign`` (``rigid`` or ``affine``) registers each moving image to its fixed image with
    that classical preset first, as prediction does before the network runs.
    """

    images: str | None = None
    labels: str | None = None
    atlas: str | None = None
    train: list[str] | None = None
    val: list[str] | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    orientation: str = "RAS"
    levels: int = 4
    percentiles: list[float] | None = field(default_factory=lambda: [1.0, 99.0])
    prealign: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: dict | None = None
    """Known-warp pairs made from real images instead of pairs of files: ``kind`` and its
    options (see :func:`learnreg.data.sources.synthetic_datasets`)."""

    def validate(self) -> DataConfig:
        given = [k for k in ("images", "train_csv", "synthetic") if getattr(self, k) is not None]
        if not given:
            raise InputError(
                "config data: give data.images (a folder), data.train_csv or data.synthetic"
            )
        if len(given) > 1:
            raise InputError(f"config data: give one of {', '.join(given)}, not several")
        check_option("config data.orientation", self.orientation, _ORIENTATIONS, InputError)
        if self.levels < 0:
            raise InputError(f"config data.levels must be >= 0, got {self.levels}")
        check_option("config data.prealign", self.prealign, _PREALIGN, InputError)
        return self


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float | None = None
    schedule: str = "constant"
    min_lr: float = 0.0
    groups: dict = field(default_factory=dict)
    """Per parameter group of the method (e.g. ``discriminator``): ``{lr, weight_decay}``
    overriding the values above for that group's optimizer, and ``every: k`` (default 1):
    the group steps only on every ``k``-th training step (steps ``k, 2k, ...``). That sets
    the update ratio of adversarial training: a generator (``model``) with ``every: 5``
    steps once per five discriminator updates."""

    def validate(self) -> OptimizerConfig:
        check_option("config optimizer.name", self.name, _OPTIMIZERS, InputError)
        if not self.lr > 0:
            raise InputError(f"config optimizer.lr must be > 0, got {self.lr}")
        check_option("config optimizer.schedule", self.schedule, _SCHEDULES, InputError)
        if not 0 <= self.min_lr <= self.lr:
            raise InputError(
                f"config optimizer.min_lr must be in [0, lr = {self.lr}], got {self.min_lr}"
            )
        for name, opts in self.groups.items():
            keys = {"lr", "weight_decay", "every"}
            bad = sorted(set(opts) - keys) if isinstance(opts, dict) else None
            if bad is None or bad:
                raise InputError(
                    f"config optimizer.groups.{name} must map lr, weight_decay and/or every "
                    f"to numbers, got {opts!r}"
                )
            if "lr" in opts and not float(opts["lr"]) > 0:
                raise InputError(f"config optimizer.groups.{name}.lr must be > 0")
            every = opts.get("every", 1)
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise InputError(
                    f"config optimizer.groups.{name}.every must be an integer >= 1 (the group "
                    f"steps on every k-th training step), got {every!r}"
                )
        return self

    def steps_on(self, group: str, step: int) -> bool:
        """Whether parameter group ``group`` is updated by training step ``step`` (1-based:
        the update that ends at ``step``)."""
        return step % int(self.groups.get(group, {}).get("every", 1)) == 0

    def lr_at(self, step: int, steps: int) -> float:
        """Learning rate of the update from step ``step`` to ``step + 1`` of ``steps``:
        ``lr`` throughout (``constant``), or decaying from ``lr`` to ``min_lr`` along a
        half cosine or a line. A pure function of the step, so a resumed run matches."""
        if self.schedule == "constant":
            return self.lr
        t = min(max(step / max(steps, 1), 0.0), 1.0)
        f = 0.5 * (1.0 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1.0 - t
        return self.min_lr + (self.lr - self.min_lr) * f


@dataclass
class TrainConfig:
    """Everything a training run needs; saved, resolved, with every checkpoint."""

    method: str
    method_config: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    steps: int = 1000
    batch_size: int = 1
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    output: str = "runs/train"
    init: str | None = None
    amp: bool = False
    device: str = "auto"
    progress: bool = True

    def validate(self) -> TrainConfig:
        if not isinstance(self.method, str) or not self.method:
            raise InputError("config method must be a method name")
        for k in ("steps", "batch_size", "val_every", "checkpoint_every", "log_every"):
            if getattr(self, k) < 1:
                raise InputError(f"config {k} must be >= 1, got {getattr(self, k)}")
        self.device = check_device_name(self.device, "config device")
        self.data.validate()
        self.optimizer.validate()
        return self

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        """Plain dict (lists, no tuples or Paths): what checkpoints and ``config.yaml`` hold."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d, "").validate()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read ``path`` and apply ``key.sub=value`` overrides (values parsed as YAML).

        Relative data paths (and an ``init`` file that exists there) are resolved against the
        YAML file's folder; ``output`` is kept relative to the working directory.
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"{path}: cannot read YAML ({str(e).splitlines()[0]})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a mapping at the top level")
        for o in overrides or []:
            key, value = parse_override(o)
            _set_path(raw, key, value, str(path))
        init = raw.get("init")
        if isinstance(init, str) and (path.parent / init).exists():
            raw["init"] = str((path.parent / init).resolve())
        data = raw.get("data")
        if isinstance(data, dict):
            for k in ("images", "labels", "train_csv", "val_csv"):
                if isinstance(data.get(k), str) and not Path(data[k]).is_absolute():
                    data[k] = str((path.parent / data[k]).resolve())
        try:
            return cls.from_dict(raw)
        except InputError as e:
            msg = str(e)
            raise InputError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=1e-3"`` → ``("optimizer.lr", 0.001)`` (the value parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"override {text!r} has no key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _set_path(d: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise InputError(f"{where}: override {key}: {p} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check and convert a YAML value to the annotated field type."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{key} must not be empty")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise InputError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InputError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise InputError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, d: dict, prefix: str) -> Any:
    """``cls(**d)`` with every field checked; ``prefix`` (``"data."``) names the section."""
    if not isinstance(d, dict):
        raise InputError(f"config {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        section = prefix.rstrip(".") or "top level"
        raise InputError(
            f"unknown config key {', '.join(prefix + k for k in unknown)} in {section}; "
            f"valid keys: {', '.join(known)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(hints[f.name], d[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"missing required config key {prefix + f.name}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
