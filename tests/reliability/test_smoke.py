"""The harness itself: a good run succeeds, a missing file is refused cleanly."""

from __future__ import annotations

from tests.reliability.conftest import assert_refused, assert_succeeded, cli, leftovers


def test_a_good_run_succeeds(inputs, work):
    done = cli(
        "register",
        inputs["fixed"],
        inputs["moving"],
        "-o",
        "out",
        "--config",
        inputs["config"],
        "-q",
        "--no-qc",
    )
    assert_succeeded(done)
    assert (work / "out" / "warp.nii.gz").is_file() and leftovers(work) == []


def test_a_missing_file_is_refused(inputs, work):
    assert_refused(cli("register", "nope.nii.gz", inputs["moving"], "-o", "out"), "nope.nii.gz")
    assert not (work / "out").exists()
