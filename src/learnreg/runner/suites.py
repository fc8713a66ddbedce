"""Named benchmark suites: which pairs and which methods, over a data root.

``lpba40-atlas``: LPBA40 atlas-to-subject, fixed S01 (the conventional atlas), moving the
held-out validation subjects S35–S40 by default, 56 labelled structures scored by Dice and
HD95. Default methods: ``classical:default`` and, when antspyx is installed, ``ants:SyN``.

The data root is ``$LEARNREG_DATA`` when set, else the first existing of ``../shared/data``
relative to the current folder and to the repository.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from learnreg.core.errors import InputError
from learnreg.data.datasets import Pair, Subject

__all__ = ["Suite", "SUITES", "get_suite", "data_root", "suite_names", "LPBA40_LABEL_NAMES"]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    default_subjects: tuple[str, ...]
    build: Callable[[Path, Sequence[str]], list[Pair]]
    methods: Callable[[], list[str]]
    label_names: Mapping[str, str] | None = None
    """Structure names of the suite's label maps (code → name), for figures and reports."""

    def pairs(self, root: Path | None = None, subjects: Sequence[str] | None = None) -> list[Pair]:
        root = data_root(root)
        return self.build(root, list(subjects) if subjects else list(self.default_subjects))

    def default_methods(self) -> list[str]:
        return self.methods()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the data sets (``lpba40/``, ``templates/``, ...)."""
    if root is not None:
        p = Path(root)
        if not p.is_dir():
            raise InputError(f"--data {p}: folder not found")
        return p
    env = os.environ.get("LEARNREG_DATA")
    if env:
        if not Path(env).is_dir():
            raise InputError(f"LEARNREG_DATA={env}: folder not found")
        return Path(env)
    candidates = [
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[3] / ".." / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise InputError(
        "no data root: pass --data ROOT or set LEARNREG_DATA (looked in "
        + ", ".join(str(c) for c in candidates)
        + ")"
    )


def _have_ants() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def _lpba40_pairs(root: Path, subjects: Sequence[str]) -> list[Pair]:
    base = root / "lpba40"
    if not (base / "images").is_dir():
        raise InputError(f"{base}: LPBA40 not found (expected images/ and labels/ inside)")
    available = sorted(p.name.removesuffix(".nii.gz") for p in (base / "images").glob("S*.nii.gz"))
    atlas = Subject(base / "images" / "S01.nii.gz", base / "labels" / "S01.nii.gz")
    pairs = []
    for s in subjects:
        s = s.strip().upper()
        if not s.startswith("S"):
            s = f"S{int(s):02d}" if s.isdigit() else s
        if s not in available:
            raise InputError(
                f"--subjects: {s} is not in {base / 'images'} (available: {', '.join(available)})"
            )
        if s == "S01":
            raise InputError("--subjects: S01 is the fixed atlas of lpba40-atlas")
        pairs.append(
            Pair.of(
                atlas, Subject(base / "images" / f"{s}.nii.gz", base / "labels" / f"{s}.nii.gz")
            )
        )  # S35_to_S01
    return pairs


def _lpba40_methods() -> list[str]:
    return ["classical:default"] + (["ants:SyN"] if _have_ants() else [])


_LPBA40_REGIONS = {
    21: "superior frontal gyrus", 23: "middle frontal gyrus", 25: "inferior frontal gyrus",
    27: "precentral gyrus", 29: "middle orbitofrontal gyrus", 31: "lateral orbitofrontal gyrus",
    33: "gyrus rectus", 41: "postcentral gyrus", 43: "superior parietal gyrus",
    45: "supramarginal gyrus", 47: "angular gyrus", 49: "precuneus",
    61: "superior occipital gyrus", 63: "middle occipital gyrus", 65: "inferior occipital gyrus",
    67: "cuneus", 81: "superior temporal gyrus", 83: "middle temporal gyrus",
    85: "inferior temporal gyrus", 87: "parahippocampal gyrus", 89: "lingual gyrus",
    91: "fusiform gyrus", 101: "insular cortex", 121: "cingulate gyrus", 161: "caudate",
    163: "putamen", 165: "hippocampus",
}  # fmt: skip
LPBA40_LABEL_NAMES: dict[str, str] = {
    **{str(k): f"L {v}" for k, v in _LPBA40_REGIONS.items()},
    **{str(k + 1): f"R {v}" for k, v in _LPBA40_REGIONS.items()},
    "181": "cerebellum",
    "182": "brainstem",
}
"""The 56 LPBA40 structures (Shattuck et al. 2008, LONI): odd codes left, even codes right."""

SUITES: dict[str, Suite] = {
    "lpba40-atlas": Suite(
        name="lpba40-atlas",
        description="LPBA40 brain MRI, fixed S01 ← moving subjects (default S35–S40), 56 labels",
        default_subjects=tuple(f"S{i}" for i in range(35, 41)),
        build=_lpba40_pairs,
        methods=_lpba40_methods,
        label_names=LPBA40_LABEL_NAMES,
    ),
}


def suite_names() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise InputError(
            f"unknown suite {name!r}; available: "
            + "; ".join(f"{s.name} ({s.description})" for s in SUITES.values())
        )
    return SUITES[name]
