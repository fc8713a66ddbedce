"""Registry of learned registration methods, with the review's Table-1 attributes.

``@register_method("voxelmorph", year=2018, ...)`` on a :class:`RegistrationMethod` subclass
records it; :func:`create_method` builds one by name from keyword config, and
:func:`available_methods` lists every method with its attributes (for ``learnreg methods``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learnreg.methods.base import RegistrationMethod

__all__ = [
    "MethodInfo",
    "register_method",
    "create_method",
    "available_methods",
    "method_info",
    "method_config_keys",
]


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: its class and the attributes of the review's Table 1."""

    name: str
    cls: type[RegistrationMethod]
    year: int
    ndim: str
    transform: str
    loss: str
    supervision: str
    reference: str
    aliases: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """First line of the class docstring."""
        return (inspect.getdoc(self.cls) or "").splitlines()[0] if self.cls.__doc__ else ""


_REGISTRY: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_method(
    name: str,
    *,
    year: int,
    ndim: str,
    transform: str,
    loss: str,
    supervision: str,
    reference: str,
    aliases: tuple[str, ...] = (),
) -> Callable[[type[RegistrationMethod]], type[RegistrationMethod]]:
    """Class decorator registering a :class:`RegistrationMethod` under ``name`` (and aliases)."""

    def deco(cls: type[RegistrationMethod]) -> type[RegistrationMethod]:
        if not (isinstance(cls, type) and issubclass(cls, RegistrationMethod)):
            raise TypeError(f"register_method({name!r}): {cls!r} is not a RegistrationMethod")
        key = _key(name)
        for k in (key, *map(_key, aliases)):
            if k in _REGISTRY or k in _ALIASES:
                raise ValueError(f"method name {k!r} is already registered")
        cls.name = key
        _REGISTRY[key] = MethodInfo(
            key, cls, int(year), ndim, transform, loss, supervision, reference, tuple(aliases)
        )
        for a in aliases:
            _ALIASES[_key(a)] = key
        return cls

    return deco


_INFRASTRUCTURE = {"base", "registry"}


def _ensure_loaded() -> None:
    """Import every module of :mod:`learnreg.methods` once, so that built-in methods register."""
    import learnreg.methods as package

    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name not in _INFRASTRUCTURE and not mod.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{mod.name}")


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name`` (case-insensitive; ``_`` and ``-`` alike)."""
    _ensure_loaded()
    key = _ALIASES.get(_key(name), _key(name))
    if key not in _REGISTRY:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(key, valid + sorted(_ALIASES), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; valid methods: {', '.join(valid)}")
    return _REGISTRY[key]


def method_config_keys(name: str) -> dict[str, Any]:
    """Constructor keywords of method ``name`` and their defaults (``inspect._empty`` if none)."""
    sig = inspect.signature(method_info(name).cls.__init__)
    return {
        p.name: p.default
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_method(name: str, **config: Any) -> RegistrationMethod:
    """Build method ``name`` from keyword ``config``.

    Raises ValueError for an unknown name or config key (listing the valid ones) and for a
    missing required key. A class may map alternative key spellings through a
    ``config_aliases`` dict (e.g. ``{"lambda": "reg_weight"}``).
    """
    info = method_info(name)
    aliases = getattr(info.cls, "config_aliases", {})
    for old, new in aliases.items():
        if old in config:
            if new in config:
                raise ValueError(f"{info.name}: give {new!r} or its alias {old!r}, not both")
            config[new] = config.pop(old)
    keys = method_config_keys(info.name)
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(
            f"{info.name}: unknown config key(s) {unknown}; valid keys: {', '.join(keys)}"
        )
    missing = [k for k, v in keys.items() if v is inspect.Parameter.empty and k not in config]
    if missing:
        raise ValueError(f"{info.name}: missing required config key(s) {missing}")
    return info.cls(**config)


def available_methods() -> list[MethodInfo]:
    """Every registered method, sorted by year then name."""
    _ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda m: (m.year, m.name))
