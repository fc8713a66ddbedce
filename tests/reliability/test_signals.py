"""Signals, kills, concurrent runs and native libraries' own output, against the installed console script in subprocesses:
SIGINT / SIGTERM end with one line and 130 / 143 and leave nothing; SIGKILL leaves the
previous folder or a complete new one, never a mix, and the next run cleans up; two runs into
one folder: one writes it, the other is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from learnreg.core.run_folder import MARKER
from tests.reliability.conftest import (
    FAST_CONFIG,
    SCRIPT,
    assert_succeeded,
    environment_without_pythonpath,
    fast_register,
    leftovers,
    snapshot,
)

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed")


@pytest.fixture
def slow_config(work: Path) -> Path:
    """A registration of several seconds on the small pair (many iterations)."""
    cfg = json.loads(json.dumps(FAST_CONFIG))
    cfg["linear"][0]["iterations"] = [4000]
    path = work / "slow.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _start(inputs, work: Path, config: Path, *extra: str) -> subprocess.Popen:
    args = [str(SCRIPT), "register", str(inputs["fixed"]), str(inputs["moving"]), "-o", "out"]
    args += ["--config", str(config), "-q", "--no-qc", "--threads", "1", *extra]
    return subprocess.Popen(
        args,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment_without_pythonpath(),
    )


def _wait_for_staging(work: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the run has claimed its output folder (its staging folder exists)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.name.startswith(".learnreg-partial-out-") for p in work.iterdir()):
            time.sleep(0.3)  # inside the optimization
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_with_one_line_and_leaves_nothing(inputs, work, slow_config, sig, code):
    proc = _start(inputs, work, slow_config)
    _wait_for_staging(work, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == code, err
    assert lines == [f"error: interrupted by {sig.name}; nothing of this run was written"], err
    assert not (work / "out").exists() and leftovers(work) == []


def test_sigint_keeps_the_previous_run(inputs, work, slow_config):
    assert_succeeded(fast_register(inputs, out=work / "out"))
    before = snapshot(work / "out")
    proc = _start(inputs, work, slow_config, "--overwrite")
    _wait_for_staging(work, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert snapshot(work / "out") == before and leftovers(work) == []


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_sigkill_leaves_old_or_new_never_a_mix(inputs, work, slow_config, delay):
    assert_succeeded(fast_register(inputs, out=work / "out"))
    before = snapshot(work / "out")
    proc = _start(inputs, work, slow_config, "--overwrite")
    _wait_for_staging(work, proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    after = snapshot(work / "out")
    if after != before:  # the new run finished before the kill: then it is whole
        assert MARKER in after and "warp.nii.gz" in after and "result.json" in after
    # the next run into the folder removes what the killed one left, and succeeds
    done = fast_register(inputs, "--overwrite", out=work / "out")
    assert_succeeded(done)
    assert leftovers(work) == []


def test_two_runs_into_one_folder(inputs, work, slow_config):
    first = _start(inputs, work, slow_config)
    _wait_for_staging(work, first)
    second = _start(inputs, work, slow_config)
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 2, err2
    lines = [x for x in err2.splitlines() if x.strip()]
    assert len(lines) == 1 and "another learnreg run" in lines[0], err2
    names = {p.name for p in (work / "out").iterdir()}
    assert {"warp.nii.gz", "affine.mat", "result.json", MARKER} <= names
    assert leftovers(work) == []


def test_native_library_messages_do_not_reach_the_terminal(inputs, work):
    from tests.reliability.faults import truncated_metaimage

    bad, problem = truncated_metaimage(inputs["moving"], work)
    args = [str(SCRIPT), "register", str(inputs["fixed"]), str(bad), "-o", "out", "-q"]
    done = subprocess.run(
        args, cwd=work, capture_output=True, text=True, env=environment_without_pythonpath()
    )
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert problem in lines[0] and bad.name in lines[0]
