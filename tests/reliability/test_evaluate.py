"""``learnreg evaluate``: a bad pairs CSV or argument gives one clean error line naming it
before anything is written, and a cached record is reused only while every input file and
the method's configuration are those it was computed from.

Pairs are the harness's 8 mm LPBA40 pair (labels merged into three structures, and a few
landmarks written here); methods
are ``transforms:`` of a saved fast registration (no registration at all), the ``classical``
presets, or a one-step 2D network; no QC figures (``--no-qc``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from learnreg.runner import evaluate as ev
from tests.reliability.conftest import (
    assert_refused,
    assert_succeeded,
    cli,
    fast_register,
    leftovers,
)

HEADER = "fixed,moving,fixed_labels,moving_labels,fixed_points,moving_points,name"
ROW = (
    "data/fixed.nii.gz,data/moving.nii.gz,data/fixed_labels.nii.gz,data/moving_labels.nii.gz,"
    "data/fixed.csv,data/moving.csv,p"
)
RECORD = Path("report/records")


@pytest.fixture
def data(inputs, work) -> Path:
    """A copy of the pair in ``work/data`` (free to change), landmarks, ``pairs.csv``."""
    folder = work / "data"
    folder.mkdir()
    for role in ("fixed", "moving", "fixed2d", "moving2d"):
        shutil.copy2(inputs[role], folder / f"{role}.nii.gz")
    for role in ("fixed_labels", "moving_labels"):  # three structures: a quick report
        img = nib.load(inputs[role])
        lab = np.asanyarray(img.dataobj)
        three = np.where(lab > 0, 1 + lab % 3, 0).astype(np.int16)
        nib.save(nib.Nifti1Image(three, img.affine, img.header), str(folder / f"{role}.nii.gz"))
    for role, shift in (("fixed", 0.0), ("moving", 3.0)):
        points = [[-20 + shift, 10, 5], [15, -25 + shift, 0], [0, 0, 20 + shift]]
        rows = "\n".join(",".join(map(str, p)) for p in points)
        (folder / f"{role}.csv").write_text(f"x,y,z\n{rows}\n", encoding="utf-8")
    (work / "pairs.csv").write_text(f"{HEADER}\n{ROW}\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def saved(inputs, tmp_path_factory) -> Path:
    """``saved/p``: the result folder of a fast registration of the pair (``transforms:``)."""
    root = tmp_path_factory.mktemp("saved") / "saved"
    done = fast_register(inputs, out=root / "p")
    assert_succeeded(done)
    return root


@pytest.fixture(scope="module")
def model2d(inputs, tmp_path_factory) -> Path:
    """The last.pt of a one-step run of a tiny 2D VoxelMorph on the 2D slices."""
    root = tmp_path_factory.mktemp("model2d")
    (root / "pairs.csv").write_text(
        f"fixed,moving\n{inputs['fixed2d']},{inputs['moving2d']}\n", encoding="utf-8"
    )
    config = {
        "method": "voxelmorph",
        "method_config": {"ndim": 2, "enc_features": [4, 8], "dec_features": [8, 8, 4]},
        "data": {"train_csv": "pairs.csv", "shape": [32, 32], "levels": 2},
        "steps": 1,
        "progress": False,
        "device": "cpu",
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert_succeeded(cli("train", root / "train.yaml", "-o", root / "run"))
    return root / "run" / "checkpoints" / "last.pt"


def evaluate(method: str, *args: str, out: str = "report") -> object:
    return cli("evaluate", "--pairs", "pairs.csv", "-m", method, "-o", out, "-q", "--no-qc",
               *args)  # fmt: skip


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The pairs evaluated (not taken from the cache), in order."""
    calls: list[str] = []
    real = ev.evaluate_pair

    def counting(method, pair, *args, **kwargs):
        calls.append(pair.name)
        return real(method, pair, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_pair", counting)
    return calls


def record(work: Path, method: str = "transforms-saved", report: str = "report") -> dict:
    path = work / report / "records" / method / "p.json"
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- bad pairs CSV
@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("", ("empty CSV",)),
        ("\n  \n", ("empty CSV",)),
        (f"{HEADER}\n", ("no pairs (only a header)",)),
        ("fixed\ndata/fixed.nii.gz\n", ("missing column(s) moving",)),
        (f"{HEADER},weight\n{ROW},1\n", ("unknown column(s) weight",)),
        ("fixed,moving,moving\ndata/fixed.nii.gz,data/moving.nii.gz,data/moving.nii.gz\n",
         ("column(s) moving appear more than once",)),
        (f"{HEADER}\n{ROW},extra\n", ("row 2 has 8 fields, the header has 7",)),
        (f"{HEADER}\n,{ROW.split(',', 1)[1]}\n", ("row 2: column 'fixed' is empty",)),
        ("fixed,moving,fixed_labels\ndata/fixed.nii.gz,data/moving.nii.gz,"
         "data/fixed_labels.nii.gz\n", ("'fixed_labels' is set but 'moving_labels' is not",)),
        (f"{HEADER}\n{ROW.replace('data/moving.nii.gz', 'data/nope.nii.gz')}\n",
         ("row 2: moving data/nope.nii.gz: file not found",)),
        (f"{HEADER}\n{ROW.replace('moving_labels.nii.gz', 'gone.nii.gz')}\n",
         ("row 2: moving_labels data/gone.nii.gz: file not found",)),
        (f"{HEADER}\n{ROW.replace('fixed.csv', 'gone.csv')}\n",
         ("row 2: fixed_points data/gone.csv: file not found",)),
        (f"{HEADER}\n{ROW}\n{ROW.replace(',p', ',q').replace('moving.nii', 'lost.nii')}\n",
         ("row 3: moving data/lost.nii.gz: file not found",)),
        (f"{HEADER}\n{ROW}\n{ROW}\n", ("row 3: pair name 'p' repeats row 2",)),
        ("fixed;moving\ndata/fixed.nii.gz;data/moving.nii.gz\n",
         ("unknown column(s) fixed;moving",)),
        (b"\xff\xfe\x00f\x00i\x00x\x00\x80\x81", ("cannot read CSV",)),
    ],
    ids=["empty", "blank", "header-only", "no-moving-column", "unknown-column",
         "repeated-column", "long-row", "empty-cell", "labels-one-side", "missing-image",
         "missing-labels", "missing-landmarks", "missing-on-row-3", "repeated-name",
         "semicolons", "not-utf8"],
)  # fmt: skip
def test_a_bad_pairs_csv_is_refused_before_anything_is_written(data, work, text, needles):
    csv = work / "pairs.csv"
    csv.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_refused(evaluate("transforms:data"), "pairs.csv", *needles)
    assert not (work / "report").exists() and leftovers(work) == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--pairs", "nope.csv"), ("nope.csv", "CSV of pairs not found")),
        (("--pairs", "data"), ("data", "CSV of pairs not a file")),
        (("--pairs", "pairs.csv", "--atlas", "data/fixed.nii.gz", "--moving-dir", "data"),
         ("not both",)),
        (("--atlas", "data/fixed.nii.gz"), ("--atlas and --moving-dir go together",)),
        ((), ("no pairs: give --pairs CSV",)),
        (("--pairs", "pairs.csv", "-m", "what:ever"), ("unknown kind 'what'",)),
        (("--pairs", "pairs.csv", "-m", "classical:fastest"), ("classical:fastest",)),
        (("--pairs", "pairs.csv", "-m", "transforms:nowhere"), ("transforms:nowhere",
                                                                "folder not found")),
        (("--pairs", "pairs.csv", "-m", "model:data/fixed.csv"), ("fixed.csv",
                                                                  "not a checkpoint")),
    ],
    ids=["csv-missing", "csv-is-a-folder", "csv-and-atlas", "atlas-alone", "no-pairs",
         "unknown-kind", "unknown-preset", "missing-transforms", "model-not-a-checkpoint"],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_written(data, work, args, needles):
    if "-m" not in args:
        args = (*args, "-m", "classical:affine")
    assert_refused(cli("evaluate", *args, "-o", "report", "-q", "--no-qc"), *needles)
    assert not (work / "report").exists()


def test_an_output_that_is_a_file_is_refused(data, saved, work):
    (work / "report").write_text("mine", encoding="utf-8")
    assert_refused(evaluate(f"transforms:{saved}"), "report", "cannot create the output folder")
    assert (work / "report").read_text(encoding="utf-8") == "mine"


def test_a_model_of_other_dimensionality_fails_its_pair_naming_the_model(data, model2d, work):
    """The pair's record says why; the others would go on, the report is written."""
    done = evaluate(f"model:{model2d}")
    assert_succeeded(done)
    error = record(work, "model-last.pt")["error"]
    assert error.startswith("pair p:") and str(model2d) in error
    assert "fixed.nii.gz is 3D, the model is 2D" in error
    assert "failed" in done.stdout and (work / "report" / "report.html").is_file()


# ---------------------------------------------------------------------------- the cache
def _roll(path: Path, shift: int = 1) -> None:
    """Rewrite an image or label map shifted by ``shift`` voxels along x (same size)."""
    img = nib.load(path)
    data = np.roll(np.asanyarray(img.dataobj), shift, axis=0)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))


def _move_landmarks(path: Path) -> None:
    """Move the first landmark 4 mm along x."""
    lines = path.read_text(encoding="utf-8").splitlines()
    x, rest = lines[1].split(",", 1)
    lines[1] = f"{float(x) + 4},{rest}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _other_moving_image(work: Path) -> None:
    """The CSV keeps the pair's name but points at another moving image."""
    shutil.copy2(work / "data" / "moving.nii.gz", work / "data" / "moving-v2.nii.gz")
    _roll(work / "data" / "moving-v2.nii.gz", 2)
    csv = work / "pairs.csv"
    csv.write_text(csv.read_text().replace("moving.nii.gz", "moving-v2.nii.gz"))


def _brighter_moving_image(work: Path) -> None:
    img = nib.load(work / "data" / "moving.nii.gz")
    data = np.asanyarray(img.dataobj).astype(np.float32) * 1.5
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(work / "data/moving.nii.gz"))


CHANGES: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "moving-labels": (lambda w: _roll(w / "data" / "moving_labels.nii.gz"), "dice_mean"),
    "fixed-labels": (lambda w: _roll(w / "data" / "fixed_labels.nii.gz"), "dice_mean"),
    "moving-landmarks": (lambda w: _move_landmarks(w / "data" / "moving.csv"), "tre_mean"),
    "fixed-landmarks": (lambda w: _move_landmarks(w / "data" / "fixed.csv"), "tre_mean"),
    "moving-image": (_brighter_moving_image, None),
    "csv-points-elsewhere": (_other_moving_image, None),
}
"""A change to one input of the pair, and the score it changes (None: none with
``transforms:``, which registers nothing)."""


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_input_is_scored_again(data, saved, work, computed, change):
    method = f"transforms:{saved}"
    assert_succeeded(evaluate(method))
    old = record(work)
    edit, score = CHANGES[change]
    edit(work)
    assert_succeeded(evaluate(method))
    assert computed == ["p", "p"]  # not the stale record
    new = record(work)
    assert_succeeded(evaluate(method, out="fresh"))
    fresh = record(work, report="fresh")
    if score is not None:
        assert new[score] == fresh[score] != old[score]
    assert new["moving"] == fresh["moving"]
    assert (new["moving"] != old["moving"]) == (change == "csv-points-elsewhere")


def test_unchanged_inputs_reuse_the_record(data, saved, work, computed):
    method = f"transforms:{saved}"
    assert_succeeded(evaluate(method))
    path = work / RECORD / "transforms-saved" / "p.json"
    before = path.read_bytes()
    assert_succeeded(evaluate(method))
    assert computed == ["p"] and path.read_bytes() == before


def test_a_changed_method_configuration_is_scored_again(data, work, computed):
    """One label, two presets: the rigid run must not reuse the affine record."""
    assert_succeeded(evaluate("mine=classical:affine"))
    affine = record(work, "mine")
    assert_succeeded(evaluate("mine=classical:rigid"))
    assert computed == ["p", "p"]
    assert record(work, "mine")["dice_mean"] != affine["dice_mean"]


def test_rewritten_transforms_are_scored_again(data, saved, work, computed):
    mine = Path(shutil.copytree(saved, work / "saved"))
    assert_succeeded(evaluate("transforms:saved"))
    result = json.loads((mine / "p" / "result.json").read_text(encoding="utf-8"))
    result["info"]["seconds"] = 123.0  # what a new run of the method would have recorded
    (mine / "p" / "result.json").write_text(json.dumps(result), encoding="utf-8")
    assert_succeeded(evaluate("transforms:saved"))
    assert computed == ["p", "p"] and record(work)["seconds"] == 123.0


def test_a_retrained_model_is_scored_again(data, model2d, work, computed):
    """The same checkpoint path, new weights: the record of the old weights is stale."""
    (work / "pairs.csv").write_text(
        "fixed,moving,name\ndata/fixed2d.nii.gz,data/moving2d.nii.gz,p\n", encoding="utf-8"
    )
    ckpt = work / "model.pt"
    shutil.copy2(model2d, ckpt)
    assert_succeeded(evaluate(f"model:{ckpt}"))
    assert record(work, "model-model.pt")["error"] is None
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt)
    assert_succeeded(evaluate(f"model:{ckpt}"))
    assert computed == ["p", "p"]
    assert record(work, "model-model.pt")["error"] is None


@pytest.mark.parametrize("damage", ["not-json", "no-cache-key", "other-key", "error-record"])
def test_a_record_that_cannot_be_trusted_is_scored_again(data, saved, work, computed, damage):
    method = f"transforms:{saved}"
    assert_succeeded(evaluate(method))
    path = work / RECORD / "transforms-saved" / "p.json"
    good = json.loads(path.read_text(encoding="utf-8"))
    if damage == "not-json":
        path.write_text('{"method": "transforms:saved", "dice', encoding="utf-8")
    else:
        rec = dict(good)
        if damage == "no-cache-key":  # as earlier versions wrote them
            rec.pop("cache_key")
        elif damage == "other-key":
            rec["cache_key"] = {**rec["cache_key"], "learnreg": "0.0.1"}
        else:
            rec["error"] = "pair p: it failed last time"
        path.write_text(json.dumps(rec), encoding="utf-8")
    assert_succeeded(evaluate(method))
    assert computed == ["p", "p"]
    again = json.loads(path.read_text(encoding="utf-8"))
    assert {k: again[k] for k in ("dice_mean", "tre_mean", "cache_key")} == {
        k: good[k] for k in ("dice_mean", "tre_mean", "cache_key")
    }
