"""Training checkpoints: atomic, resumable, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python types (dict, list, str, int, float, bool,
None)::

    format          CHECKPOINT_FORMAT (int)
    learnreg        version string of the package that wrote it
    method          the method's registry name
    step            optimizer steps done
    model           the method's state_dict
    optimizer       {group: optimizer state_dict} (or None; one state_dict when given one)
    scaler          the AMP GradScaler's state_dict (or None)
    rng             {"torch": uint8 tensor, "cuda": [uint8 tensors], "numpy": [...],
                     "python": [...]}: the global random states, as plain types
    config          the resolved configuration (plain dict)
    extra           anything else plain (best validation Dice, ...)

Every problem with the file — missing, corrupt, another method, an incompatible version —
raises :class:`~learnreg.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnreg import __version__
from learnreg.core.errors import InputError
from learnreg.core.files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "compatible_version",
]

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict:
    """The global torch (CPU and CUDA), numpy and Python random states as plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [int(version), [int(v) for v in state], gauss],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where devices exist)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.cpu().to(torch.uint8) for c in cuda])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, pstate, gauss = state["python"]
    random.setstate((version, tuple(pstate), gauss))


# ---------------------------------------------------------------------------- versions
def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def compatible_version(written_by: str, running: str | None = None) -> bool:
    """Same major version (and, before 1.0, the same minor version); unknown versions pass."""
    a, b = _major_minor(written_by), _major_minor(__version__ if running is None else running)
    if a is None or b is None:
        return True
    if a[0] != b[0]:
        return False
    return a[0] > 0 or a[1] == b[1]


# ---------------------------------------------------------------------------- save / load
def _check_plain(x: Any, where: str) -> None:
    if isinstance(x, torch.Tensor) or x is None or isinstance(x, bool | int | float | str):
        return
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint {where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where}: {type(x).__name__} is not a tensor or plain type")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | dict,
    method: str,
    step: int,
    config: dict,
    optimizer: torch.optim.Optimizer | dict | None = None,
    scaler: Any = None,
    rng: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file beside ``path``, then ``os.replace``).

    ``rng`` defaults to :func:`capture_rng_state` now. Raises ``TypeError`` if anything is
    not a tensor or a plain type (it could not be loaded with ``weights_only=True``), and
    :class:`InputError` naming ``path`` when it cannot be written (a full disk, ...): the
    file already at ``path``, if any, is then left as it was.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "learnreg": __version__,
        "method": str(method),
        "step": int(step),
        "model": model if isinstance(model, dict) else model.state_dict(),
        "optimizer": optimizer.state_dict()
        if isinstance(optimizer, torch.optim.Optimizer)
        else optimizer,
        "scaler": scaler.state_dict()
        if scaler is not None and hasattr(scaler, "state_dict")
        else scaler,
        "rng": capture_rng_state() if rng is None else rng,
        "config": config,
        "extra": extra or {},
    }
    _check_plain(state, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        buffer = io.BytesIO()
        torch.save(state, buffer)  # in memory: torch reports a failed file write vaguely
        tmp.write_bytes(buffer.getbuffer())  # a full disk: OSError, the old file untouched
    return path


_REQUIRED = ("format", "learnreg", "method", "step", "model")


def load_checkpoint(
    path: str | os.PathLike,
    expected_method: str | tuple[str, ...] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a checkpoint (always ``weights_only=True``) and check it.

    Raises:
        InputError: missing or corrupt file, not a learnreg checkpoint, written by an
            incompatible learnreg version or checkpoint format, or (with
            ``expected_method``, a name or several) a checkpoint of another method.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip archive, a legacy pickle
        raise InputError(f"{path}: not a checkpoint (not a file torch.save writes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a {unsafe.group(1)} object" if unsafe else "objects"
        raise InputError(
            f"{path}: not a loadable learnreg checkpoint: it holds {what} other than tensors "
            "and plain types, which learnreg does not load (weights_only)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{path}: corrupt checkpoint, truncated or damaged ({msg[:160]})"
        ) from None
    except Exception as e:  # torch raises many kinds on truncated files
        raise InputError(f"{path}: corrupt checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise InputError(f"{path}: not a learnreg training checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path}: checkpoint format {state['format']} is not supported by learnreg "
            f"{__version__} (expects format {CHECKPOINT_FORMAT})"
        )
    if not compatible_version(str(state["learnreg"])):
        raise InputError(
            f"{path}: written by learnreg {state['learnreg']}, incompatible with the installed "
            f"learnreg {__version__}"
        )
    expected = (expected_method,) if isinstance(expected_method, str) else expected_method
    if expected is not None and state["method"] not in expected:
        want = " or ".join(map(repr, expected))
        raise InputError(f"{path}: checkpoint of method {state['method']!r}, expected {want}")
    return state
