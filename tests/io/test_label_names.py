"""Structure names from ITK-SNAP label files, FreeSurfer LUTs and CSV/TSV tables; the LPBA40
table names exactly the 56 codes of the real label maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from learnreg.core.errors import InputError
from learnreg.io.label_names import read_label_names
from learnreg.runner.suites import LPBA40_LABEL_NAMES

ITKSNAP = """################################################
# ITK-SnAP Label Description File
#    IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
################################################
    0     0    0    0        0  0  0    "Clear Label"
   21   255    0    0        1  1  1    "L superior frontal gyrus"
  182     0  255    0        1  1  1    "brainstem"
"""
LUT = """#No. Label Name:                            R   G   B   A
0   Unknown                                 0   0   0   0
17  Left-Hippocampus                        220 216 20  0
"""


@pytest.mark.parametrize(
    "name,text,expected",
    [
        (
            "labels.txt",
            ITKSNAP,
            {"0": "Clear Label", "21": "L superior frontal gyrus", "182": "brainstem"},
        ),
        ("FreeSurferColorLUT.txt", LUT, {"0": "Unknown", "17": "Left-Hippocampus"}),
        ("names.csv", "index,name\n21,L SFG\n22.0,R SFG\n", {"21": "L SFG", "22": "R SFG"}),
        ("names.csv", "label,structure,volume\n5,thalamus,3\n", {"5": "thalamus"}),
        ("names.csv", "index,label\n7,putamen\n", {"7": "putamen"}),
        ("names.csv", "1,one\n2,two\n", {"1": "one", "2": "two"}),
        ("names.tsv", "code\tname\n3\tcaudate\n", {"3": "caudate"}),
    ],
)
def test_tables_people_have(tmp_path: Path, name: str, text: str, expected: dict):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_label_names(path) == expected


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("bad.csv", "index,name\n2.5,half\n", ":2: label code '2.5' is not an integer"),
        ("bad.txt", "x one\n", ":1: label code 'x' is not a number"),
        ("bad.txt", "5\n", ":1: expected a label code and a name"),
        ("empty.csv", "# nothing\n", "no label names found"),
    ],
)
def test_bad_tables_name_the_file_and_line(tmp_path: Path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=str(path).replace(".", r"\.") + ".*") as e:
        read_label_names(path)
    assert message in str(e.value)
    with pytest.raises(InputError, match="not found"):
        read_label_names(tmp_path / "missing.csv")


def test_lpba40_names_cover_exactly_its_labels(lpba: Path):
    codes = np.unique(np.asarray(nib.load(lpba / "labels" / "S01.nii.gz").dataobj))
    assert {str(c) for c in codes if c} == set(LPBA40_LABEL_NAMES)
    assert len(set(LPBA40_LABEL_NAMES.values())) == 56
    assert (
        LPBA40_LABEL_NAMES["165"] == "L hippocampus"
        and LPBA40_LABEL_NAMES["166"] == "R hippocampus"
    )
