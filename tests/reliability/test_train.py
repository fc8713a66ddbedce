"""``learnreg train`` and its checkpoints: every bad run folder, config, data or checkpoint
file gives one clean error line naming it, and leaves what was there as it was.

Training runs a two-level 2D VoxelMorph of a few hundred weights for one to three steps on
the 64×64 slices of the harness (``inputs``), on a 32×32 network grid.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from learnreg.train.checkpoint import load_checkpoint
from tests.reliability.conftest import (
    assert_refused,
    assert_succeeded,
    cli,
    leftovers,
    snapshot,
)

TINY = {
    "method": "voxelmorph",
    "method_config": {"ndim": 2, "enc_features": [4, 8], "dec_features": [8, 8, 4], "window": 5},
    "data": {"train_csv": "pairs2d.csv", "val_csv": "pairs2d.csv", "shape": [32, 32], "levels": 2},
    "steps": 2,
    "val_every": 1,
    "checkpoint_every": 1,
    "log_every": 1,
    "progress": False,
    "device": "cpu",
}
"""Two steps of a tiny 2D VoxelMorph, validated and checkpointed at every step."""

THREE_D = ("--set", "method_config.ndim=3", "--set", "data.train_csv=pairs3d.csv",
           "--set", "data.val_csv=null", "--set", "data.shape=[16,16,16]")  # fmt: skip
"""Overrides that train the same network in 3D on the harness's 8 mm LPBA40 pair."""


@pytest.fixture(scope="module")
def setup(inputs, tmp_path_factory) -> Path:
    """``train.yaml`` (:data:`TINY`) beside CSVs of 2D, 3D and mixed pairs."""
    root = tmp_path_factory.mktemp("train-setup")
    rows = {
        "pairs2d.csv": (inputs["fixed2d"], inputs["moving2d"]),
        "pairs3d.csv": (inputs["fixed"], inputs["moving"]),
        "mixed.csv": (inputs["fixed2d"], inputs["moving"]),
    }
    for name, (f, m) in rows.items():
        (root / name).write_text(f"fixed,moving\n{f},{m}\n", encoding="utf-8")
    (root / "train.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return root


def train(setup: Path, out: Path, *args: str) -> object:
    return cli("train", setup / "train.yaml", "-o", out, *args)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """A finished two-step run: config.yaml, log.csv, best/last/step_000000{1,2}.pt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert_succeeded(train(setup, out))
    assert (out / "checkpoints" / "step_0000002.pt").is_file()
    return out


@pytest.fixture
def run(finished, work) -> Path:
    """A copy of the finished run in this case's working folder, free to damage."""
    return Path(shutil.copytree(finished, work / "run"))


# ---------------------------------------------------------------------------- run folder
def _user_file(run: Path) -> str:
    run.mkdir(exist_ok=True)
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    return "notes.txt"


def _user_file_in_checkpoints(run: Path) -> str:
    (run / "checkpoints" / "mine.txt").write_text("mine", encoding="utf-8")
    return "checkpoints/mine.txt"


def _user_folder(run: Path) -> str:
    (run / "results").mkdir()
    return "results"


def _nothing(run: Path) -> str:
    return "checkpoints"


@pytest.mark.parametrize(
    ("previous", "prepare", "flags", "needles"),
    [
        ("run", _nothing, (), ("run folder is not empty", "--resume", "--overwrite")),
        ("none", _user_file, (), ("run folder is not empty", "notes.txt")),
        ("none", _user_file, ("--overwrite",), ("replaces only a learnreg training run",
                                                "notes.txt")),
        ("run", _user_file, ("--overwrite",), ("holds other files", "notes.txt")),
        ("run", _user_file_in_checkpoints, ("--overwrite",), ("checkpoints/mine.txt",)),
        ("run", _user_folder, ("--overwrite",), ("holds other files", "results")),
        ("run", _nothing, ("--resume", "--overwrite"), ("give one of them",)),
    ],
    ids=["run-no-flag", "user-file-no-flag", "user-file-overwrite", "run-plus-user-file",
         "user-file-in-checkpoints", "user-folder", "resume-and-overwrite"],
)  # fmt: skip
def test_a_folder_that_is_not_free_is_refused_and_kept(
    setup, finished, work, previous, prepare, flags, needles
):
    out = work / "run"
    if previous == "run":
        shutil.copytree(finished, out)
    prepare(out)
    before = snapshot(out)
    line = assert_refused(train(setup, out, *flags), *needles)
    if "one of them" not in line:
        assert str(out) in line
    assert snapshot(out) == before


def test_output_that_is_a_file_is_refused(setup, work):
    out = work / "run"
    out.write_text("not a folder", encoding="utf-8")
    assert_refused(train(setup, out), str(out), "is not a folder")
    assert out.read_text(encoding="utf-8") == "not a folder"


def test_overwrite_leaves_no_stale_checkpoint(setup, run, work):
    """A one-step retrain without validation: the old run's best.pt and step_0000002.pt go."""
    done = train(setup, run, "--overwrite", "--set", "steps=1", "--set", "data.val_csv=null")
    assert_succeeded(done)
    assert sorted(snapshot(run / "checkpoints")) == ["last.pt", "step_0000001.pt"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["val_csv"] is None
    assert leftovers(work) == []


def test_the_config_inside_its_run_folder_is_kept(setup, work):
    """A folder holding only the config is free; --overwrite never deletes the config."""
    out = work / "experiment"
    out.mkdir()
    config = out / "train.yaml"
    csv = str(setup / "pairs2d.csv")
    data = {**TINY["data"], "train_csv": csv, "val_csv": csv}
    config.write_text(yaml.safe_dump({**TINY, "data": data}), encoding="utf-8")
    before = config.read_bytes()
    assert_succeeded(cli("train", config, "-o", out, "--set", "steps=1"))
    assert (out / "checkpoints" / "best.pt").is_file()
    done = cli("train", config, "-o", out, "--overwrite", "--set", "data.val_csv=null")
    assert_succeeded(done)
    assert config.read_bytes() == before
    assert not (out / "checkpoints" / "best.pt").exists()  # the first run's, removed


# ---------------------------------------------------------------------------- resume
def _no_folder(run: Path) -> None:
    shutil.rmtree(run)


def _killed_before_first_checkpoint(run: Path) -> None:
    for f in (run / "checkpoints").iterdir():
        f.unlink()


def _truncated_last(run: Path) -> None:
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])


def _text_last(run: Path) -> None:
    (run / "checkpoints" / "last.pt").write_text("not a checkpoint", encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "overrides", "needles"),
    [
        (_no_folder, (), ("nothing to resume", "last.pt does not exist")),
        (_killed_before_first_checkpoint, (), ("nothing to resume", "last.pt")),
        (_truncated_last, (), ("last.pt", "corrupt checkpoint, truncated")),
        (_text_last, (), ("last.pt", "not a checkpoint")),
        (None, ("method_config.enc_features=[8,8]",), ("last.pt", "does not fit this config")),
        (None, ("method=voxelmorph-weakly",), ("last.pt", "expected 'voxelmorph-weakly'")),
        (None, ("method_config.ndim=3",), ("train.yaml", "method_config.ndim is 3", "2D")),
    ],
    ids=["no-folder", "no-last", "truncated-last", "text-last", "other-architecture",
         "other-method", "other-ndim"],
)  # fmt: skip
def test_resume_refuses_what_it_cannot_continue(setup, run, damage, overrides, needles):
    if damage is not None:
        damage(run)
    before = snapshot(run)
    sets = [a for o in overrides for a in ("--set", o)]
    assert_refused(train(setup, run, "--resume", "--set", "steps=3", *sets), *needles)
    assert snapshot(run) == before
    assert run.exists() == (damage is not _no_folder)


def test_resume_continues_the_run(setup, run):
    assert_succeeded(train(setup, run, "--resume", "--set", "steps=3"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert (run / "checkpoints" / "step_0000001.pt").is_file()  # the earlier steps stay


# ---------------------------------------------------------------------------- dimensionality
@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (("method_config.ndim=3",), ("train.yaml", "method_config.ndim is 3", "2D",
                                     "fixed2d.nii.gz")),
        (("method_config.ndim=2", "data.train_csv=pairs3d.csv", "data.val_csv=null",
          "data.shape=null"), ("train.yaml", "method_config.ndim is 2", "3D", "fixed.nii.gz")),
        (("data.train_csv=mixed.csv",), ("moving.nii.gz", "3D image in a dataset of 2D")),
        (("data.val_csv=pairs3d.csv",), ("fixed.nii.gz", "3D image in a dataset of 2D")),
    ],
    ids=["ndim3-on-2d", "ndim2-on-3d", "mixed-train-pair", "3d-validation-pair"],
)  # fmt: skip
def test_data_of_other_dimensionality_is_refused(setup, work, overrides, needles):
    sets = [a for o in overrides for a in ("--set", o)]
    assert_refused(train(setup, work / "run", *sets), *needles)
    assert not (work / "run").exists()


def test_init_from_a_checkpoint_of_other_dimensionality(setup, checkpoint3d, work):
    done = train(setup, work / "run", "--set", f"init={checkpoint3d}")
    assert_refused(done, str(checkpoint3d), "init weights do not fit")
    assert not (work / "run").exists()


# ---------------------------------------------------------------------------- full disk
class _Saves:
    """``torch.save`` (or the checkpoint's write) failing at call ``fail_at`` with ENOSPC."""

    def __init__(self, fail_at: int, how: str) -> None:
        self.fail_at, self.how, self.calls = fail_at, how, 0
        self.real_save, self.real_write = torch.save, Path.write_bytes

    def save(self, obj, f, *args, **kwargs):
        if self.how == "torch.save":
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
        return self.real_save(obj, f, *args, **kwargs)

    def write_bytes(self, path: Path, data) -> int:
        if path.suffix == ".pt" and self.how == "write":
            self.calls += 1
            if self.calls == self.fail_at:  # the disk fills up half way through the file
                self.real_write(path, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return self.real_write(path, data)


@pytest.mark.parametrize("how", ["torch.save", "write"])
@pytest.mark.parametrize(("fail_at", "target"), [(1, "step_0000003.pt"), (2, "last.pt")])
def test_a_full_disk_keeps_the_previous_checkpoint(
    setup, run, work, monkeypatch, how, fail_at, target
):
    """Step 3 writes step_0000003.pt, then last.pt; the failing write leaves the old file."""
    ckpt = run / "checkpoints"
    before = {f: (ckpt / f).read_bytes() for f in sorted(snapshot(ckpt))}
    saves = _Saves(fail_at, how)
    monkeypatch.setattr(torch, "save", saves.save)
    monkeypatch.setattr(Path, "write_bytes", lambda path, data: saves.write_bytes(path, data))
    done = train(setup, run, "--resume", "--set", "steps=3", "--set", "val_every=100")
    assert_refused(done, f"{target}: cannot write", "No space left on device", "step 3",
                   "intact")  # fmt: skip
    monkeypatch.undo()
    after = {f: (ckpt / f).read_bytes() for f in sorted(snapshot(ckpt))}
    assert set(after) == set(before) | ({"step_0000003.pt"} if fail_at == 2 else set())
    assert {f: after[f] for f in before} == before  # last.pt and the others, byte for byte
    assert load_checkpoint(ckpt / "last.pt")["step"] == 2
    assert leftovers(work) == []


def test_a_full_disk_at_the_first_checkpoint_leaves_none(setup, work, monkeypatch):
    monkeypatch.setattr(torch, "save", _Saves(1, "torch.save").save)
    assert_refused(train(setup, work / "run"), "best.pt: cannot write", "No space left")
    assert snapshot(work / "run" / "checkpoints") == {}
    assert leftovers(work) == []


# ---------------------------------------------------------------------------- checkpoints as models
@pytest.fixture(scope="module")
def checkpoint3d(setup, tmp_path_factory) -> Path:
    """The last.pt of a one-step 3D run of the same tiny network."""
    out = tmp_path_factory.mktemp("run3d") / "run"
    assert_succeeded(train(setup, out, "--set", "steps=1", *THREE_D))
    return out / "checkpoints" / "last.pt"


def _edited(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def make(good: Path, bad: Path) -> None:
        state = torch.load(good, weights_only=True)
        edit(state)
        torch.save(state, bad)

    return make


def _truncated(good: Path, bad: Path) -> None:
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _image(good: Path, bad: Path) -> None:
    bad.write_bytes(b"\x5c\x01\x00\x00" + bytes(400))  # a NIfTI-1 header, renamed .pt


def _object(state: dict) -> None:
    state["extra"]["where"] = Path("/tmp")  # not a tensor nor a plain type


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (_truncated, ("corrupt checkpoint, truncated",)),
        (_image, ("not a checkpoint",)),
        (_edited(lambda s: s.pop("model")), ("not a learnreg training checkpoint",)),
        (_edited(lambda s: s["extra"].pop("preprocess")), ("lacks the preprocessing record",)),
        (_edited(lambda s: s["model"].popitem()), ("cannot rebuild method 'voxelmorph'",)),
        (_edited(lambda s: s["extra"]["grid"].pop("spacing")),
         ("corrupt preprocessing record", "spacing")),
        (_edited(lambda s: s.update(format=99)), ("checkpoint format 99 is not supported",)),
        (_edited(lambda s: s.update(learnreg="99.0")), ("written by learnreg 99.0",)),
        (_edited(_object), ("not a loadable learnreg checkpoint", "PosixPath")),
    ],
    ids=["truncated", "not-a-checkpoint", "no-model-key", "no-preprocessing",
         "missing-weight", "corrupt-grid", "other-format", "other-version", "unsafe-object"],
)  # fmt: skip
def test_a_bad_checkpoint_file_is_refused_by_register(inputs, finished, work, make, needles):
    bad = work / "model.pt"
    make(finished / "checkpoints" / "last.pt", bad)
    done = cli("register", inputs["fixed2d"], inputs["moving2d"], "-o", "out", "--model", bad,
               "-q", "--no-qc")  # fmt: skip
    assert_refused(done, str(bad), *needles)
    assert not (work / "out").exists() and leftovers(work) == []


@pytest.mark.parametrize(
    ("model", "pair", "needles"),
    [
        ("2d", ("fixed", "moving"), ("fixed.nii.gz is 3D, the model is 2D",)),
        ("3d", ("fixed2d", "moving2d"), ("fixed2d.nii.gz is 2D, the model is 3D",)),
    ],
    ids=["2d-model-3d-pair", "3d-model-2d-pair"],
)
def test_a_model_of_other_dimensionality_is_refused_by_register(
    inputs, finished, checkpoint3d, work, model, pair, needles
):
    ckpt = finished / "checkpoints" / "last.pt" if model == "2d" else checkpoint3d
    done = cli("register", inputs[pair[0]], inputs[pair[1]], "-o", "out", "--model", ckpt,
               "-q", "--no-qc")  # fmt: skip
    assert_refused(done, str(ckpt), "cannot register this pair", *needles)
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_good_checkpoint_registers_its_own_dimensionality(inputs, finished, work):
    done = cli("register", inputs["fixed2d"], inputs["moving2d"], "-o", "out", "--model",
               finished / "checkpoints" / "last.pt", "-q", "--no-qc")  # fmt: skip
    assert_succeeded(done)
    assert (work / "out" / "result.json").is_file()
