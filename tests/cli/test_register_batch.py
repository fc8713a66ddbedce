"""``learnreg register-batch`` on real LPBA40 pairs at 4 mm, on a dask ``LocalCluster``.

The fast tests share one 2-worker ``LocalCluster`` that they reach through ``--scheduler``
(the code path of an existing cluster), so that its workers import learnreg once; the
cluster the command starts itself (``--workers 2``) is tested in a slow test."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from learnreg.api.registration import load_result
from learnreg.cli.main import app
from learnreg.core.errors import InputError
from learnreg.core.run_folder import MARKER
from learnreg.io.images import read_image, write_image
from learnreg.runner.cluster import local_layout
from tests.runner.test_evaluate import make_small_lpba

pytest.importorskip("distributed")

runner = CliRunner()
SUBJECTS = ("S01", "S11", "S12", "S13", "S14")
# a short classical run (affine, then a few SVF steps) so that a batch takes seconds
FAST = """\
linear:
  - {model: affine, metric: ncc, shrink: [2], iterations: [25], learning_rate: 0.01}
deformable: {model: svf, metric: lncc, window: 3, shrink: [2], velocity_shrink: [4],
             iterations: [15], learning_rate: 0.5, regularization: {diffusion: 1.0}}
"""
OPTIONS = ["--method", "classical", "--config", "fast.yaml", "-q"]


@pytest.fixture(scope="module")
def data(lpba, tmp_path_factory) -> Path:
    """Five LPBA40 subjects at 4 mm, a fast config and a CSV of 4 pairs (relative paths)."""
    root = tmp_path_factory.mktemp("batch")
    make_small_lpba(lpba, root / "lpba", subjects=SUBJECTS, factor=4.0)
    (root / "fast.yaml").write_text(FAST)
    rows = ["fixed,moving,fixed_labels,moving_labels,id"]
    for f, m, name in (("S01", "S11", "a"), ("S01", "S12", "b"), ("S11", "S13", ""),
                       ("S12", "S14", "")):  # fmt: skip
        labels = f"lpba/labels/{f}.nii.gz,lpba/labels/{m}.nii.gz" if name else ","
        rows.append(f"lpba/images/{f}.nii.gz,lpba/images/{m}.nii.gz,{labels},{name}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def invoke(root: Path, *args: str):
    """The command line, run from ``root`` (relative paths as a user types them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return runner.invoke(app, list(args), catch_exceptions=False)


def _points(folder: Path) -> np.ndarray:
    """Where the result maps fixed-grid points (every 3rd voxel), fixed → moving, in mm."""
    reg = load_result(folder)
    grid = reg.result.fixed_grid
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(0, n, 3) for n in grid.shape], indexing="ij"), -1
    ).reshape(-1, grid.ndim)
    world = grid.index_to_world(idx.double()).numpy()
    return reg.map_points(world), reg.map_points(world, inverse=True)


PAIRS = ("a", "b", "S13_to_S11", "S14_to_S12")


@pytest.fixture(scope="module")
def cluster() -> str:
    """The scheduler address of a LocalCluster of 2 single-threaded worker processes."""
    from distributed import LocalCluster

    kw = {"dashboard_address": None, "silence_logs": logging.ERROR}
    with warnings.catch_warnings():  # its HTTP port taken by another cluster: any will do
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **kw)
    with c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def batch(data, cluster) -> Path:
    on = ["--scheduler", cluster, "--threads", "1"]
    res = invoke(data, "register-batch", "pairs.csv", "-o", "out", *on, *OPTIONS)
    assert res.exit_code == 0, res.output
    assert "4 registered, 0 failed, 0 done earlier" in res.output
    assert "2 workers × 1 threads" in res.output
    return data / "out"


def test_batch_equals_single_registrations(data, batch):
    """Pair for pair, the batch's transforms are those of single `learnreg register` runs."""
    summary = json.loads((batch / "summary.json").read_text())
    assert summary["registered"] == 4 and {r["status"] for r in summary["records"]} == {"ok"}
    assert len({r["pid"] for r in summary["records"]}) == 2  # both workers registered pairs
    singles = {
        "a": ("S01", "S11", True), "b": ("S01", "S12", True),
        "S13_to_S11": ("S11", "S13", False), "S14_to_S12": ("S12", "S14", False),
    }  # fmt: skip
    for name, (f, m, labels) in singles.items():
        args = ["register", f"lpba/images/{f}.nii.gz", f"lpba/images/{m}.nii.gz"]
        if labels:
            args += ["--fixed-labels", f"lpba/labels/{f}.nii.gz"]
            args += ["--moving-labels", f"lpba/labels/{m}.nii.gz"]
        res = invoke(data, *args, "-o", f"single/{name}", "--threads", "1", *OPTIONS)
        assert res.exit_code == 0, res.output
        (fwd_b, inv_b), (fwd_s, inv_s) = _points(batch / name), _points(data / "single" / name)
        assert np.abs(fwd_b - fwd_s).max() < 1e-5 and np.abs(inv_b - inv_s).max() < 1e-5
        # the registration moved the points (not an identity on both sides)
        assert np.linalg.norm(fwd_s - _points_identity(data / "single" / name), axis=1).mean() > 1
        got = json.loads((batch / name / "metrics.json").read_text())
        want = json.loads((data / "single" / name / "metrics.json").read_text())
        assert ("dice" in json.dumps(got)) == labels and got.get("dice") == want.get("dice")


def _points_identity(folder: Path) -> np.ndarray:
    grid = load_result(folder).result.fixed_grid
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(0, n, 3) for n in grid.shape], indexing="ij"), -1
    ).reshape(-1, grid.ndim)
    return grid.index_to_world(idx.double()).numpy()


def test_rerun_after_a_kill_recomputes_only_unfinished_pairs(data, batch, cluster):
    """A batch killed mid-way: two pairs finished, one left a staging folder, one never
    started; a rerun registers those two only, and a failing pair stops nothing."""
    out = data / "rerun"
    shutil.copytree(batch, out, symlinks=True)
    shutil.rmtree(out / "S13_to_S11")  # killed while being written: only its staging folder
    stale = out / ".learnreg-partial-S13_to_S11-dead"
    stale.mkdir()
    (stale / "warp.nii.gz").write_bytes(b"half")
    shutil.rmtree(out / "S14_to_S12")  # never started
    before = {n: {p.name: p.stat().st_mtime_ns for p in (out / n).iterdir()} for n in "ab"}
    flat = read_image(data / "lpba/images/S14.nii.gz")
    flat.data.fill_(3.0)
    write_image(flat, data / "flat.nii.gz")
    csv = (data / "pairs.csv").read_text() + "lpba/images/S01.nii.gz,flat.nii.gz,,,flat\n"
    (data / "pairs5.csv").write_text(csv)
    on = ["--scheduler", cluster, "--threads", "1"]
    res = invoke(data, "register-batch", "pairs5.csv", "-o", "rerun", *on, *OPTIONS)
    assert res.exit_code == 1, res.output  # a pair failed
    assert "2 registered, 1 failed, 2 done earlier" in res.output
    assert "failed flat:" in res.output and "flat.nii.gz" in res.output
    after = {n: {p.name: p.stat().st_mtime_ns for p in (out / n).iterdir()} for n in "ab"}
    assert after == before  # the finished pairs were not touched
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["id"] for r in summary["records"]) == ["S13_to_S11", "S14_to_S12", "flat"]
    assert sorted(summary["skipped_ids"]) == ["a", "b"]
    assert not stale.exists()  # the killed run's staging folder was cleaned up
    for name in ("S13_to_S11", "S14_to_S12"):
        assert (out / name / MARKER).is_file()
        assert np.abs(_points(out / name)[0] - _points(batch / name)[0]).max() < 1e-5
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "id,fixed,moving,error" and failures[1].startswith("flat,")
    assert not (out / "flat").exists()
    # nothing left to do: every pair is skipped, a changed option redoes them all
    res = invoke(data, "register-batch", "pairs.csv", "-o", "rerun", *on, *OPTIONS)
    assert res.exit_code == 0 and "0 registered, 0 failed, 4 done earlier" in res.output
    assert not (out / "failures.csv").exists()


@pytest.mark.slow
def test_own_local_cluster_gives_the_same_transforms(data, batch):
    """Without --scheduler the command starts (and stops) its own LocalCluster."""
    res = invoke(data, "register-batch", "pairs.csv", "-o", "own", "--workers", "2", *OPTIONS)
    assert res.exit_code == 0, res.output
    assert "4 registered" in res.output and "2 workers × 1 threads, scheduler local" in res.output
    for name in PAIRS:
        assert np.abs(_points(data / "own" / name)[0] - _points(batch / name)[0]).max() < 1e-5


@pytest.mark.parametrize(
    ("csv", "needle"),
    [
        ("fixed\nlpba/images/S01.nii.gz\n", "missing column(s) moving"),
        ("fixed,moving\nlpba/images/S01.nii.gz,lpba/images/S99.nii.gz\n",
         "row 2: moving lpba/images/S99.nii.gz: file not found"),
        ("fixed,moving,id\nlpba/images/S01.nii.gz,lpba/images/S11.nii.gz,x\n"
         "lpba/images/S01.nii.gz,lpba/images/S12.nii.gz,x\n", "row 3: pair name 'x' repeats row 2"),
    ],
)  # fmt: skip
def test_bad_csv_is_one_line_before_any_work(data, csv, needle):
    (data / "bad.csv").write_text(csv)
    with pytest.raises(InputError) as e:
        invoke(data, "register-batch", "bad.csv", "-o", "never", *OPTIONS)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (data / "never").exists()


def test_bad_options_and_foreign_output_folder(data):
    (data / "mine").mkdir()
    (data / "mine" / "notes.txt").write_text("user's")
    for args, needle in (
        (["-o", "mine"], "not a register-batch output folder"),
        (["-o", "x", "--workers", "0"], "--workers must be >= 1"),
        (["-o", "x", "--output-format", "zip"], "--output-format"),
        (["-o", "x", "--scheduler", "tcp://h:1", "--workers", "2"], "--workers sizes a local"),
    ):
        with pytest.raises(InputError, match=needle):
            invoke(data, "register-batch", "pairs.csv", *args, *OPTIONS)
    assert (data / "mine" / "notes.txt").read_text() == "user's"


def test_local_layout_fills_the_cores():
    assert local_layout(4, cores=2) == (2, 1)
    assert local_layout(4, cores=16) == (4, 4)
    assert local_layout(100, cores=16) == (16, 1)
    assert local_layout(100, threads=4, cores=16) == (4, 4)
    assert local_layout(3, workers=1, cores=8) == (1, 8)


def test_evaluate_on_the_cluster_gives_the_sequential_records(data, cluster):
    """`learnreg evaluate --scheduler`: the same records as pair by pair in this process."""
    from learnreg.data.datasets import pairs_from_csv
    from learnreg.runner.evaluate import evaluate

    pairs = pairs_from_csv(data / "pairs.csv", must_exist=True)
    kw = {"qc": False, "report": False, "progress": False}
    seq = evaluate(["classical:affine"], pairs, data / "eval-seq", **kw)
    par = evaluate(
        ["classical:affine"], pairs, data / "eval-par", scheduler=cluster, threads=1, **kw
    )
    assert [r["pair"] for r in par] == [r["pair"] for r in seq] == [p.name for p in pairs]
    for a, b in zip(seq, par, strict=True):
        assert a["error"] is None and b["error"] is None
        for k in ("dice_mean", "hd95_mean", "ice_mean"):
            assert (a[k] is None) == (b[k] is None) and (a[k] or 0) == pytest.approx(b[k] or 0)
    assert seq[0]["dice_mean"] > 0.3  # pairs with labels are scored
    again = evaluate(["classical:affine"], pairs, data / "eval-par", scheduler=cluster, **kw)
    assert again == par  # every record cached: nothing ran again
