"""The run folder of ``learnreg train``: one run's files, never a mix of two.

A run folder holds what :class:`~learnreg.train.trainer.Trainer` writes (:data:`RUN_FILES`).
A new run goes into a new or empty folder; ``resume`` continues the run whose
``checkpoints/last.pt`` is there; ``overwrite`` removes an earlier run's files first (so no
stale ``best.pt`` or ``step_*.pt`` survives), and only from a folder that holds nothing else:
learnreg never deletes files it did not write.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from learnreg.core.errors import InputError

__all__ = ["RUN_FILES", "check_run_folder", "clear_run_folder"]

RUN_FILES = ("checkpoints", "config.yaml", "log.csv", "tensorboard")
"""What a training run writes into its folder."""


def _ours(p: Path) -> bool:
    """A temporary file or folder of an interrupted atomic write."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _foreign(folder: Path) -> list[str]:
    """Entries of a run folder that no training run wrote (``checkpoints/`` holds ``*.pt``)."""
    out = [p.name for p in folder.iterdir() if p.name not in RUN_FILES and not _ours(p)]
    ckpt = folder / "checkpoints"
    if ckpt.is_dir():
        out += [
            f"checkpoints/{p.name}"
            for p in ckpt.iterdir()
            if not (p.is_file() and p.suffix == ".pt") and not _ours(p)
        ]
    return sorted(out)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def check_run_folder(
    folder: str | Path, resume: bool, overwrite: bool, config: str | Path | None = None
) -> None:
    """Refuse, with an :class:`InputError` naming ``folder``, a run that would mix with or
    wrongly delete what is there.

    ``resume`` needs ``folder/checkpoints/last.pt``; a fresh run needs a new or empty folder,
    or ``overwrite`` and a folder holding an earlier run's files only. The training
    ``config`` file itself may lie in the folder (it is never deleted).
    """
    folder = Path(folder)
    if resume and overwrite:
        raise InputError(
            "--resume continues the run in the output folder, --overwrite replaces it: "
            "give one of them"
        )
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose another output folder")
    last = folder / "checkpoints" / "last.pt"
    if resume:
        if not last.is_file():
            raise InputError(
                f"{folder}: nothing to resume, {last} does not exist; train without --resume "
                "to start a new run"
            )
        return
    if not folder.is_dir():
        return
    keep = Path(config).resolve() if config is not None else None
    entries = sorted(p.name for p in folder.iterdir() if p.resolve() != keep)
    if not entries:
        return
    if not overwrite:
        raise InputError(
            f"{folder}: run folder is not empty ({_shown(entries)}); pass --resume to continue "
            "its run, --overwrite to replace it, or choose another output folder"
        )
    foreign = [n for n in _foreign(folder) if (folder / n).resolve() != keep]
    if not (folder / "checkpoints").is_dir() or foreign:
        raise InputError(
            f"{folder}: --overwrite replaces only a learnreg training run folder, and this one "
            f"holds other files ({_shown(foreign or entries)}); move them away or choose "
            "another output folder"
        )


def clear_run_folder(folder: str | Path) -> None:
    """Remove the files of an earlier run (:data:`RUN_FILES` and interrupted writes) from
    ``folder``; anything else there is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name in RUN_FILES or _ours(p):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as e:
                raise InputError(
                    f"{p}: cannot remove the earlier run's files ({e.strerror or e})"
                ) from None
