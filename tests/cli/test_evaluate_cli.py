"""``learnreg evaluate`` / ``learnreg benchmark`` through Typer's test runner."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from learnreg.cli.evaluate import register_command
from learnreg.core.errors import InputError
from tests.runner.test_evaluate import make_small_lpba

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register_command(app)
    return app


@pytest.fixture(scope="module")
def root(lpba, tmp_path_factory):
    """A data root laid out like ../shared/data, with small LPBA40 copies."""
    r = tmp_path_factory.mktemp("data")
    make_small_lpba(lpba, r / "lpba40", subjects=("S01", "S35"))
    return r


def test_evaluate_pairs_csv_prints_table_and_report(app, root, tmp_path):
    small = root / "lpba40"
    csv = tmp_path / "pairs.csv"
    (tmp_path / "S99.nii.gz").write_bytes(b"not an image")  # fails when evaluated
    csv.write_text(
        "fixed,moving,fixed_labels,moving_labels,fixed_points,moving_points\n"
        f"{small}/images/S01.nii.gz,{small}/images/S35.nii.gz,{small}/labels/S01.nii.gz,"
        f"{small}/labels/S35.nii.gz,{small}/points/S01.csv,{small}/points/S35.csv\n"
        f"{small}/images/S01.nii.gz,{tmp_path}/S99.nii.gz,,,,\n"
    )
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["evaluate", "--pairs", str(csv), "-m", "classical:affine", "-o", str(out), "-q"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "classical:affine" in res.output and "1/2" in res.output  # one pair failed
    assert "Dice [95% CI]" in res.output and "report:" in res.output
    assert "failed classical:affine · S99_to_S01" in res.output and "S99.nii.gz" in res.output
    assert (out / "report.html").is_file()
    assert (out / "records/classical-affine/S35_to_S01.json").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate", "-m", "classical:affine", "-o", "x"], "no pairs"),
        (["evaluate", "-m", "nope:x", "-o", "x", "--atlas", "A", "--moving-dir", "D"],
         "atlas image not found"),
        (["benchmark", "nosuch", "-o", "x"], "unknown suite 'nosuch'; available: lpba40-atlas"),
        (["evaluate", "-m", "classical:affine", "-o", "x", "--pairs", "p.csv", "--label-names",
          "missing-names.csv"], "missing-names.csv"),
    ],
)  # fmt: skip
def test_bad_input_raises_input_error(app, args, needle):
    with pytest.raises(InputError) as e:
        runner.invoke(app, args, catch_exceptions=False)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_benchmark_suite_on_a_data_root(app, root, tmp_path):
    with pytest.raises(InputError, match="S77 is not in"):
        runner.invoke(app, ["benchmark", "lpba40-atlas", "--data", str(root), "-s", "S77",
                            "-o", str(tmp_path)], catch_exceptions=False)  # fmt: skip
    with pytest.raises(InputError, match="unknown kind 'bogus'"):
        runner.invoke(app, ["benchmark", "lpba40-atlas", "--data", str(root), "-s", "S35",
                            "-m", "bogus:1", "-o", str(tmp_path)], catch_exceptions=False)  # fmt: skip
    out = tmp_path / "bench"
    res = runner.invoke(
        app,
        ["benchmark", "lpba40-atlas", "--data", str(root), "-s", "S35", "-m", "classical:affine",
         "--no-isolate", "-o", str(out), "-q"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "lpba40-atlas" in res.output and "1/1" in res.output
    assert (out / "records/classical-affine/S35_to_S01.json").is_file()
    # the suite's structure names reach the tables; one pair gets the small-sample note
    rows = (out / "per_structure.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].endswith(",name") and any(r.endswith(",L hippocampus") for r in rows)
    assert "Only 1 pair" in (out / "report.md").read_text(encoding="utf-8")
    names = tmp_path / "names.csv"
    names.write_text("index,name\n165,hippocampus (left)\n", encoding="utf-8")
    res = runner.invoke(
        app,
        ["benchmark", "lpba40-atlas", "--data", str(root), "-s", "S35", "-m", "classical:affine",
         "--no-isolate", "-o", str(out), "-q", "--label-names", str(names)],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = (out / "per_structure.csv").read_text(encoding="utf-8")
    assert ",hippocampus (left)" in text and "L hippocampus" not in text


def test_suite_defaults():
    from learnreg.runner.suites import get_suite

    suite = get_suite("lpba40-atlas")
    assert suite.default_subjects == ("S35", "S36", "S37", "S38", "S39", "S40")
    assert suite.default_methods()[0] == "classical:default"
