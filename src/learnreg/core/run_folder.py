"""An output folder belongs to one run: staged, locked, swapped into place whole.

:func:`output_folder` is how every command writes its folder of results:

* a non-empty folder is refused unless ``overwrite`` — and then only one that learnreg
  wrote (it holds :data:`MARKER`), so that ``-o .`` never deletes a user's files;
* files are written into a hidden staging folder beside it, and the staging folder replaces
  the output folder in one step when the run succeeds (Linux ``renameat2`` exchange where
  available, else two renames): the folder holds one run's files, never a mix of two, and a
  run that fails or is killed leaves the previous folder as it was;
* an exclusive lock (``flock`` on a hidden file beside the folder, released by the kernel
  when a process dies) refuses a second run into the same folder while one is writing;
* staging folders of dead runs are removed (and a folder a killed run had moved aside is put
  back) by the next run into the same folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from learnreg.core.errors import InputError

__all__ = ["output_folder", "MARKER", "written_by_learnreg"]

MARKER = ".learnreg-output.json"
"""The file that marks a folder as one learnreg wrote (command, version, process)."""

_PARTIAL, _OLD, _LOCK = ".learnreg-partial-", ".learnreg-old-", ".learnreg-lock-"


def written_by_learnreg(folder: Path) -> bool:
    """Whether ``folder`` is a result folder of learnreg (this version's marker, or an earlier
    version's ``result.json``)."""
    return (folder / MARKER).is_file() or (folder / "result.json").is_file()


@contextlib.contextmanager
def output_folder(
    out: str | os.PathLike, overwrite: bool = False, command: str = "learnreg"
) -> Iterator[Path]:
    """Yield a staging folder for the files of ``out``; on success it becomes ``out``.

    Raises :class:`InputError` when ``out`` is not empty (without ``overwrite``), holds files
    learnreg did not write (with it), is being written by another run, or cannot be written.
    """
    out = Path(out).absolute()
    parent = out.parent
    if not out.name or out == parent:
        raise InputError(f"{out}: not a folder learnreg can write its results to")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    with _locked(parent / f"{_LOCK}{out.name}", out):
        _clean_after_dead_runs(out)
        _check_replaceable(out, overwrite)
        try:
            stage = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{out.name}-", dir=parent))
        except OSError as e:
            raise InputError(
                f"{out}: cannot write to the output folder ({e.strerror or e})"
            ) from None
        try:
            yield stage
            marker = {"command": command, "pid": os.getpid(), "version": _version()}
            try:
                (stage / MARKER).write_text(json.dumps(marker), encoding="utf-8")
                _sync_folder(stage)
                _swap_into_place(stage, out)
            except OSError as e:
                raise InputError(f"{out}: cannot write ({e.strerror or e})") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _version() -> str:
    from learnreg import __version__

    return __version__


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != MARKER)
    if not entries:
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if not overwrite:
        raise InputError(
            f"{out}: output folder is not empty ({len(entries)} entries: {shown}); pass "
            "--overwrite to replace it, or choose another folder"
        )
    if not written_by_learnreg(out):
        raise InputError(
            f"{out}: --overwrite replaces only a folder that learnreg wrote, and this one holds "
            f"other files ({shown}); move them away or choose another folder"
        )


def _clean_after_dead_runs(out: Path) -> None:
    """Remove what killed runs into ``out`` left (the caller holds the lock: no live run into
    ``out`` exists); a folder moved aside by a run killed mid-swap goes back in place."""
    parent = out.parent
    for p in parent.iterdir():
        if p.name.startswith(f"{_OLD}{out.name}-") and p.is_dir():
            if not out.exists():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f"{_PARTIAL}{out.name}-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if out.is_dir():  # staging folders inside the output folder, as earlier versions made
        for p in out.iterdir():
            if p.name.startswith(_PARTIAL) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_into_place(stage: Path, out: Path) -> None:
    """Make ``stage`` the folder ``out``; the previous ``out`` ends up in ``stage``'s place
    (removed by the caller)."""
    if not out.exists():
        os.rename(stage, out)
        return
    if _exchange(stage, out):
        return
    aside = out.parent / f"{_OLD}{out.name}-{os.getpid()}-{os.urandom(4).hex()}"
    os.rename(out, aside)  # killed between these two renames: the next run puts it back
    os.rename(stage, out)
    os.rename(aside, stage)  # so that the caller removes it


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # a filesystem or kernel without exchange
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _locked(lock_path: Path, out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed, removed after)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the rest still holds
        yield
        return
    for _ in range(5):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{out}: cannot write beside it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"{out}: another learnreg run (pid {holder}) is writing this folder; wait for "
                "it to finish or choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the lock file was replaced while we waited for it: take the new one
    else:  # pragma: no cover - five replacements in a row
        raise InputError(f"{out}: could not lock the output folder")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
