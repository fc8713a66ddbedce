"""The runner: method specs, records, resume, per-pair errors, TRE, isolation, ANTs.

(The pairs CSV and atlas helpers are :mod:`learnreg.data.datasets`'s, tested in
tests/data/test_datasets.py.)"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from learnreg.core.errors import InputError
from learnreg.data.datasets import Pair
from learnreg.io.images import read_image, read_labels, write_image
from learnreg.io.points import write_points
from learnreg.metrics import mean_dice, score_result
from learnreg.runner import evaluate as ev
from learnreg.runner import methods as rm
from learnreg.runner.evaluate import evaluate, evaluate_pair
from learnreg.runner.methods import resolve_method
from learnreg.spatial.sampling import resample

SUBJECTS = ("S01", "S35", "S36")


def make_small_lpba(lpba: Path, dst: Path, subjects=SUBJECTS, factor: float = 3.0) -> Path:
    """LPBA40 subjects downsampled ×factor into ``dst/images`` and ``dst/labels`` (label-safe),
    plus label-centroid landmarks ``dst/points/Sxx.csv`` (RAS mm, one row per label)."""
    for sub in ("images", "labels", "points"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for s in subjects:
        img = read_image(lpba / f"images/{s}.nii.gz")
        grid = img.grid.downsampled(factor)
        write_image(resample(img, grid), dst / f"images/{s}.nii.gz")
        lab = resample(read_labels(lpba / f"labels/{s}.nii.gz"), grid, mode="label")
        write_image(lab, dst / f"labels/{s}.nii.gz")
        a = lab.data[0].numpy()
        ids = [int(v) for v in np.unique(a) if v != 0]
        cents = np.array(ndimage.center_of_mass(np.ones_like(a), a, ids))
        world = grid.index_to_world(torch.from_numpy(cents)).numpy()
        write_points(dst / f"points/{s}.csv", world, extra={"label": ids})
    return dst


@pytest.fixture(scope="module")
def small(lpba, tmp_path_factory) -> Path:
    return make_small_lpba(lpba, tmp_path_factory.mktemp("lpba_small"))


@pytest.fixture(autouse=True)
def report_stub(monkeypatch):
    """Use the real report writer when present; a minimal stand-in otherwise."""
    try:
        import learnreg.eval.report  # noqa: F401
    except ImportError:
        import types

        mod = types.ModuleType("learnreg.eval.report")

        def write_report(records, outdir, title="learnreg evaluation", reference=None):
            p = Path(outdir) / "report.html"
            p.write_text("<html>" + json.dumps(records) + "</html>")
            return {"html": p}

        mod.write_report = write_report
        monkeypatch.setitem(sys.modules, "learnreg.eval.report", mod)


def _pair(small: Path, s: str, labels=True, points=False, name=None) -> Pair:
    return Pair(
        name=name or f"{s}_to_S01",
        fixed=small / "images/S01.nii.gz",
        moving=small / f"images/{s}.nii.gz",
        fixed_labels=small / "labels/S01.nii.gz" if labels else None,
        moving_labels=small / f"labels/{s}.nii.gz" if labels else None,
        fixed_points=small / "points/S01.csv" if points else None,
        moving_points=small / f"points/{s}.csv" if points else None,
    )


def _identity_dice(small: Path, s: str) -> float:
    f = read_labels(small / "labels/S01.nii.gz")
    m = resample(read_labels(small / f"labels/{s}.nii.gz"), f.grid, mode="label")
    return mean_dice(f.data[0], m.data[0])


# ---------------------------------------------------------------------------- methods
def test_resolve_method_specs_and_errors(tmp_path, monkeypatch):
    assert resolve_method("classical:affine").name == "classical:affine"
    assert resolve_method("mine=classical:rigid").name == "mine"
    assert resolve_method("transforms:" + str(tmp_path)).name == f"transforms:{tmp_path.name}"
    with pytest.raises(InputError, match="unknown kind 'foo'; known: .*classical"):
        resolve_method("foo:bar")
    with pytest.raises(InputError, match="expected KIND:ARGUMENT"):
        resolve_method("classical")
    with pytest.raises(InputError, match="classical:nonsense"):
        resolve_method("classical:nonsense")
    with pytest.raises(InputError, match="folder not found"):
        resolve_method(f"transforms:{tmp_path / 'missing'}")
    with pytest.raises(InputError, match="options are refine=N, got 'steps=3'"):
        resolve_method("model:lpba40-vxm-svf,steps=3")
    monkeypatch.setitem(sys.modules, "ants", None)  # simulate antspyx not installed
    with pytest.raises(InputError, match="antspyx is not installed"):
        resolve_method("ants:SyN")


def test_register_method_plugs_in_a_new_kind(small, tmp_path):
    """Learned models plug in through the registry; every method is scored alike."""
    from learnreg.spatial.result import RegistrationResult

    class Identity:
        name = "identity"

        def register(self, fixed, moving, pair=None):
            return RegistrationResult(fixed.grid, moving.grid)

    rm.register_method("identity")(lambda arg: Identity())
    try:
        rec = evaluate_pair("identity:x", _pair(small, "S35"), tmp_path, qc=False)
    finally:
        rm._REGISTRY.pop("identity")
    assert rec["error"] is None and rec["method"] == "identity"
    assert rec["dice_mean"] == pytest.approx(_identity_dice(small, "S35"), abs=1e-9)
    assert rec["folding_count"] == 0 and rec["ice_mean"] is None


def test_records_hold_the_numbers_of_score_result(small, tmp_path):
    """The runner scores with :func:`learnreg.metrics.score_result`, the function
    ``learnreg register`` and training validation use too."""
    from learnreg.data.datasets import load_pair
    from learnreg.spatial.affine import AffineTransform
    from learnreg.spatial.result import RegistrationResult

    shift = torch.eye(4)
    shift[:3, 3] = torch.tensor([2.0, -1.0, 1.5])

    class Shift:
        name = "shift"

        def register(self, fixed, moving, pair=None):
            affine = AffineTransform(shift[None])
            return RegistrationResult(fixed.grid, moving.grid, affine, info={"seconds": 0.25})

    pair = _pair(small, "S35", points=True)
    rec = evaluate_pair(Shift(), pair, tmp_path, qc=False)
    assert rec["error"] is None, rec["error"]
    inp = load_pair(pair)
    scores = score_result(
        Shift().register(inp.fixed, inp.moving),
        fixed_labels=inp.fixed_labels,
        moving_labels=inp.moving_labels,
        fixed_points=inp.fixed_points,
        moving_points=inp.moving_points,
    )
    for key in ("dice", "dice_mean", "hd95", "hd95_mean", "tre_mean", "tre_max",
                "folding_fraction", "folding_count", "sdlogj", "ice_mean"):  # fmt: skip
        assert rec[key] == scores[key], key
    assert rec["seconds"] == 0.25  # the method's own timing wins over the runner's


# ---------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def bad_inputs(small) -> Path:
    bad = small / "bad"
    bad.mkdir(exist_ok=True)
    lab = read_labels(small / "labels/S36.nii.gz")
    data = lab.data.clone()
    data[data == 22] = 0  # drop one structure
    write_image(lab.with_data(data), bad / "S36_missing22.nii.gz")
    (bad / "points_wrong.csv").write_text("a,b,c\n1,2,3\n")
    (bad / "points_short.csv").write_text("x,y,z\n1,2,3\n")
    write_image(_slice2d(small), bad / "slice2d.nii.gz")
    return bad


def _slice2d(small: Path):
    from learnreg.core.grid import Grid
    from learnreg.core.image import Image

    img = read_image(small / "images/S36.nii.gz")
    return Image(img.data[:, :, :, 27], Grid(img.grid.shape[:2], img.grid.spacing[:2]), "2d")


def _with(p: Pair, **kw) -> Pair:
    return dataclasses.replace(p, **kw)


@pytest.fixture(scope="module")
def run(small, bad_inputs, tmp_path_factory):
    """One evaluation: two good pairs (one with landmarks) and four bad ones."""
    out = tmp_path_factory.mktemp("eval_out")
    good = [_pair(small, "S35", points=True), _pair(small, "S36")]
    bad = [
        _with(good[1], name="labels_differ", moving_labels=bad_inputs / "S36_missing22.nii.gz"),
        _with(good[1], name="missing_file", moving=small / "images/S99.nii.gz"),
        _with(good[0], name="bad_landmarks", moving_points=bad_inputs / "points_wrong.csv"),
        _with(good[0], name="count_landmarks", moving_points=bad_inputs / "points_short.csv"),
        _with(good[1], name="dims", moving=bad_inputs / "slice2d.nii.gz", moving_labels=None,
              fixed_labels=None),
    ]  # fmt: skip
    pairs = good[:1] + bad + good[1:]  # failing pairs in the middle
    records = evaluate(["classical:affine"], pairs, out, progress=False)
    return out, pairs, records


def test_records_are_complete_and_registration_helps(run, small):
    out, pairs, records = run
    assert [r["pair"] for r in records] == [p.name for p in pairs]
    good = {r["pair"]: r for r in records if r["error"] is None}
    assert set(good) == {"S35_to_S01", "S36_to_S01"}
    for s in ("S35", "S36"):
        r = good[f"{s}_to_S01"]
        assert set(r) == set(ev.RECORD_KEYS)
        assert r["method"] == "classical:affine"
        assert len(r["dice"]) == 56 and all(isinstance(k, str) for k in r["dice"])
        assert r["dice_mean"] > _identity_dice(small, s) + 0.01
        assert 0 < r["hd95_mean"] < 20 and len(r["hd95"]) == 56
        assert r["folding_count"] == 0 and r["sdlogj"] == 0.0 and r["ice_mean"] is None
        assert r["seconds"] > 0 and r["peak_memory_mb"] is None  # memory only when isolated
        assert (out / r["qc_png"]).is_file()
        cached = json.loads(ev.record_path(out, "classical:affine", pairs[0]).read_text())
        assert cached["pair"] == "S35_to_S01"
    assert good["S36_to_S01"]["tre_mean"] is None
    assert (out / "report.html").is_file()


def test_tre_from_label_centroid_landmarks(run, small):
    from learnreg.io.points import read_points

    rec = next(r for r in run[2] if r["pair"] == "S35_to_S01")
    before = np.linalg.norm(
        read_points(small / "points/S01.csv") - read_points(small / "points/S35.csv"), axis=1
    )
    assert rec["tre_max"] >= rec["tre_mean"] > 0
    assert rec["tre_mean"] < before.mean()


def test_bad_pairs_give_error_records_naming_the_pair(run):
    errors = {r["pair"]: r["error"] for r in run[2] if r["error"]}
    assert set(errors) == {"labels_differ", "missing_file", "bad_landmarks", "count_landmarks",
                           "dims"}  # fmt: skip
    for name, msg in errors.items():
        assert msg.startswith(f"pair {name}:"), msg
    assert "label sets differ (only in fixed: 22)" in errors["labels_differ"]
    assert "S99.nii.gz: file not found" in errors["missing_file"]
    assert "points_wrong.csv: missing column(s) x, y, z" in errors["bad_landmarks"]
    assert "landmark counts differ: 56 fixed" in errors["count_landmarks"]
    assert "3D but moving image is 2D" in errors["dims"]
    for r in run[2]:
        if r["error"]:
            assert r["dice_mean"] is None and r["qc_png"] is None


def test_resume_skips_finished_pairs(run, monkeypatch):
    out, pairs, first = run
    calls = []
    orig = rm.ClassicalMethod.register

    def counting(self, fixed, moving, pair=None):
        calls.append(pair.name)
        return orig(self, fixed, moving, pair)

    monkeypatch.setattr(rm.ClassicalMethod, "register", counting)
    again = evaluate(["classical:affine"], pairs, out, progress=False)
    assert calls == []  # good pairs cached; bad pairs retried but fail before registering
    assert [r["dice_mean"] for r in again] == [r["dice_mean"] for r in first]
    evaluate(["classical:affine"], pairs[:1], out, resume=False, progress=False, qc=False)
    assert calls == ["S35_to_S01"]


def test_transforms_folder_from_saved_results(run, small, tmp_path):
    """``transforms:DIR`` scores saved results exactly like the run that produced them."""
    from learnreg.io.result import save_result
    from learnreg.optimize.classical import register

    pair = _pair(small, "S35", points=True)
    fixed, moving = read_image(pair.fixed), read_image(pair.moving)
    result = register(fixed, moving, "affine")
    (tmp_path / "saved" / pair.name).mkdir(parents=True)
    save_result(result, tmp_path / "saved" / pair.name)
    rec = evaluate_pair(f"transforms:{tmp_path / 'saved'}", pair, tmp_path / "out")
    direct = evaluate_pair(rm.ClassicalMethod("affine"), pair, tmp_path / "out2", qc=False)
    assert rec["error"] is None and rec["method"] == "transforms:saved"
    assert rec["dice_mean"] == pytest.approx(direct["dice_mean"], abs=0.01)
    assert rec["seconds"] == pytest.approx(result.info["seconds"])  # the original run's time
    assert (tmp_path / "out" / rec["qc_png"]).is_file()
    other = evaluate_pair(f"transforms:{tmp_path / 'saved'}", _pair(small, "S36"), tmp_path)
    assert "no transforms for pair 'S36_to_S01'" in other["error"]


def test_isolated_worker_reports_its_own_peak_memory(small, tmp_path):
    pair = _pair(small, "S35", labels=False)
    (rec,) = evaluate(["classical:affine"], [pair], tmp_path, isolate=True, progress=False,
                      qc=False, report=False)  # fmt: skip
    assert rec["error"] is None, rec["error"]
    assert rec["peak_memory_mb"] > 50 and rec["seconds"] > 0 and rec["dice_mean"] is None
    (bad,) = evaluate(["classical:affine"], [_with(pair, name="x", moving=tmp_path / "no.nii")],
                      tmp_path, isolate=True, progress=False, report=False)  # fmt: skip
    assert bad["error"].startswith("pair x:") and "file not found" in bad["error"]


def test_evaluate_rejects_bad_arguments(small, tmp_path):
    p = _pair(small, "S35")
    with pytest.raises(InputError, match="no methods"):
        evaluate([], [p], tmp_path)
    with pytest.raises(InputError, match="repeated: S35_to_S01"):
        evaluate(["classical:affine"], [p, p], tmp_path)
    with pytest.raises(InputError, match="method names must be distinct"):
        evaluate(["classical:affine", "classical:affine"], [p], tmp_path)


# ---------------------------------------------------------------------------- ANTs
def test_ants_outputs_and_ants_method(small, tmp_path):
    ants = pytest.importorskip("ants")
    pair = _pair(small, "S35", points=True)
    f = ants.image_read(str(pair.fixed))
    m = ants.image_read(str(pair.moving))
    (tmp_path / "ants" / pair.name).mkdir(parents=True)
    ants.registration(
        f, m, "SyN", reg_iterations=(20, 10), aff_iterations=(30, 10),
        aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0),
        outprefix=str(tmp_path / "ants" / pair.name / "reg_"),
    )  # fmt: skip
    rec = evaluate_pair(f"transforms:{tmp_path / 'ants'}", pair, tmp_path / "out")
    assert rec["error"] is None, rec["error"]
    assert rec["dice_mean"] > _identity_dice(small, "S35") + 0.03
    assert rec["ice_mean"] is not None and rec["ice_mean"] < 1.0  # 1InverseWarp was read
    assert rec["folding_fraction"] is not None and rec["sdlogj"] > 0
    assert rec["seconds"] is None  # precomputed elsewhere: no time to report
    assert rec["tre_mean"] < 10
    aff = evaluate_pair("ants:Affine", _pair(small, "S36"), tmp_path / "out", qc=False)
    assert aff["error"] is None, aff["error"]
    assert aff["method"] == "ants:Affine" and aff["seconds"] > 0
    assert aff["dice_mean"] > _identity_dice(small, "S36") + 0.01


def test_threads_travel_to_isolated_workers(tmp_path, monkeypatch):
    """--threads reaches the worker process's command line, and the worker applies it."""
    seen = {}

    class Done:
        returncode, stdout, stderr = 1, "", "stopped here"

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(ev.subprocess, "run", fake_run)
    pair = Pair.from_dict(
        {
            "name": "m_to_f",
            "fixed": str(tmp_path / "f.nii.gz"),
            "moving": str(tmp_path / "m.nii.gz"),
        }
    )
    rec = ev._run_isolated("classical:affine", pair, tmp_path, qc=False, threads=3)
    assert seen["cmd"][-2:] == ["--threads", "3"] and "stopped here" in rec["error"]
    n = torch.get_num_threads()
    ev._worker(["--worker", "--method", "nope:x", "--pair", json.dumps(pair.to_dict()),
                "--outdir", str(tmp_path), "--record", str(tmp_path / "r.json"), "--threads", "2"])  # fmt: skip
    assert torch.get_num_threads() == 2
    torch.set_num_threads(n)
    assert "nope" in json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["error"]
