"""Which torch device a command computes on."""

from __future__ import annotations

import re

import torch

from learnreg.core.errors import InputError

__all__ = ["DEVICES", "check_device_name", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")
"""Device names a user may give (also ``cuda:N``)."""

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def check_device_name(name: str, what: str = "device") -> str:
    """``name`` normalized (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), or :class:`InputError`."""
    key = str(name).strip().lower()
    if key not in DEVICES and _CUDA_INDEX.match(key) is None:
        raise InputError(f"{what} {name!r}: expected one of auto, cpu, cuda, cuda:N")
    return key


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device called ``name``: ``auto`` (CUDA, this process's local GPU, where one is
    available, else CPU), ``cpu``, ``cuda`` (GPU ``local_rank``) or ``cuda:N``.

    Raises :class:`InputError` for an unknown name or a GPU that this machine or this torch
    build does not have."""
    key = check_device_name(name)
    index = _CUDA_INDEX.match(key)
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        raise InputError(f"device {name!r} requested but CUDA is not available ({build})")
    number = int(index.group(1)) if index else local_rank
    if number >= torch.cuda.device_count():
        raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", number)
