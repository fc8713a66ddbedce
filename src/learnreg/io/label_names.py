"""Names of label-map structures, from the tables people have: ITK-SNAP label descriptions,
FreeSurfer colour tables, and CSV/TSV files.

- ITK-SNAP: ``IDX R G B A VIS MSH "LABEL"`` per line, ``#`` comments.
- FreeSurfer ``*LUT.txt``: ``code name R G B A`` per line, ``#`` comments.
- CSV / TSV with a header: a code column (``index``, ``label``, ``code``, ``id``, ``value``
  or ``idx``) and a name column (``name``, ``label_name``, ``structure``, ``region`` or
  ``description``); or without header, ``code,name`` rows.

Codes are returned as strings (the keys of Dice records), names stripped of quotes.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
from pathlib import Path

from learnreg.core.errors import InputError

__all__ = ["read_label_names"]

_CODE_COLUMNS = ("index", "label", "code", "id", "value", "idx")
_NAME_COLUMNS = ("name", "label_name", "structure", "region", "description")


def _code(path: Path, line: int, text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}:{line}: label code {text!r} is not a number") from None
    if value != int(value):
        raise InputError(f"{path}:{line}: label code {text!r} is not an integer")
    return str(int(value))


def _whitespace_table(path: Path, text: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = shlex.split(line)
        except ValueError as e:
            raise InputError(f"{path}:{n}: unreadable line ({e})") from None
        if len(parts) >= 8 and all(re.fullmatch(r"-?[\d.]+", p) for p in parts[1:7]):
            code, name = parts[0], " ".join(parts[7:])  # ITK-SNAP
        elif len(parts) >= 2:
            code, name = parts[0], parts[1]  # FreeSurfer LUT (and plain "code name")
        else:
            raise InputError(f"{path}:{n}: expected a label code and a name, got {line!r}")
        names[_code(path, n, code)] = name
    return names


def _delimited_table(path: Path, text: str, delimiter: str) -> dict[str, str]:
    rows = [
        r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)
    ]
    rows = [r for r in rows if not r[0].lstrip().startswith("#")]
    if not rows:
        return {}
    header = [c.strip().lower() for c in rows[0]]
    code_col = next((header.index(c) for c in _CODE_COLUMNS if c in header), None)
    name_col = next(
        (header.index(c) for c in _NAME_COLUMNS if c in header and header.index(c) != code_col),
        None,
    )
    if code_col is not None and name_col is None and len(header) == 2:  # e.g. "index,label"
        name_col = 1 - code_col
    body, first = rows, 1
    if code_col is not None and name_col is not None and code_col != name_col:
        body, first = rows[1:], 2
    else:
        code_col, name_col = 0, 1
    names: dict[str, str] = {}
    for n, row in enumerate(body, first):
        if len(row) <= max(code_col, name_col):
            raise InputError(f"{path}:{n}: expected a label code and a name, got {row}")
        names[_code(path, n, row[code_col].strip())] = row[name_col].strip()
    return names


def read_label_names(path: str | os.PathLike) -> dict[str, str]:
    """Label code → structure name from a label table (see the module docstring).

    Raises :class:`InputError` naming the file (and line) for a missing or unreadable file,
    a non-integer code or a line without a name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: label name file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read label names ({e})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        names = _delimited_table(path, text, ",")
    elif suffix == ".tsv":
        names = _delimited_table(path, text, "\t")
    else:
        names = _whitespace_table(path, text)
    if not names:
        raise InputError(f"{path}: no label names found")
    return names
