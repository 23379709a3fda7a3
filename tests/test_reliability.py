"""Faults, with real subprocesses and real signals: preemption, a kill mid-write, divergence, and
the one-line errors of the main job."""

import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config=configs/default.py:tiny"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _train(workdir, *flags, timeout=600):
    """Runs the main job to the end; returns the finished process."""
    return subprocess.run(
        [*TINY, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(workdir, *flags):
    return subprocess.Popen(
        [*TINY, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def _train_records(workdir):
    with open(os.path.join(workdir, "dpo", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r["split"] == "train"]


def _logged_steps(workdir) -> int:
    path = os.path.join(workdir, "dpo", "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


# 24 DPO steps, a metrics record every step, no periodic checkpoint before the end but the first.
LONG = ["--config.dpo.num_steps=24", "--config.checkpoint.every_steps=1000"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    process = _train(workdir, *LONG)
    assert process.returncode == 0, process.stderr
    return _train_records(workdir)


def _assert_same_run(workdir, uninterrupted):
    records = _train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, 25))  # each step once, none missing
    for got, want in zip(records, uninterrupted, strict=True):
        for name in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert got[name] == want[name], (got["step"], name)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_the_restart_continues_the_same_run(
    tmp_path, uninterrupted, signum
):
    process = _start(tmp_path, *LONG)
    _wait_for(lambda: _logged_steps(tmp_path) >= 5, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    name = signal.Signals(signum).name
    assert f"[dpo] {name} received: saved step" in stderr and "rerun the same command" in stderr
    saved = int(stderr.split("saved step ")[1].split()[0])
    assert 5 <= saved < 24
    assert str(saved) in os.listdir(tmp_path / "dpo" / "checkpoints")

    resumed = _train(tmp_path, *LONG)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resumes(
    tmp_path, uninterrupted
):
    # A checkpoint every step: orbax writes in the background into a temporary directory that it
    # renames when complete, so a write is nearly always in flight; kill the moment one is seen.
    # The rename can win the race against the kill: then try again, in a fresh workdir.
    flags = ["--config.dpo.num_steps=24", "--config.checkpoint.every_steps=1"]
    for attempt in range(5):
        workdir = tmp_path / str(attempt)
        process = _start(workdir, *flags)
        pattern = str(workdir / "dpo" / "checkpoints" / "*.orbax-checkpoint-tmp*")
        _wait_for(lambda w=workdir, p=pattern: _logged_steps(w) >= 4 and glob.glob(p), process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        if glob.glob(pattern):  # killed mid-write
            break
    assert glob.glob(pattern), "no kill landed during a write in 5 attempts"
    complete = [int(name) for name in os.listdir(workdir / "dpo" / "checkpoints") if name.isdigit()]
    assert complete, "the previous checkpoints are intact"
    resumed = _train(workdir, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert not glob.glob(pattern)  # the partial write was cleaned up
    _assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_a_diverging_run_stops_naming_the_step_and_writes_nothing_non_finite(
    tmp_path, on_nonfinite
):
    process = _train(
        tmp_path,
        "--config.sft.num_steps=0",
        "--config.dpo.num_steps=30",
        "--config.optimizer.learning_rate=1e30",
        "--config.checkpoint.every_steps=1",
        f"--config.guards.on_nonfinite={on_nonfinite}",
        "--config.guards.max_skipped_steps=3",
    )
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    if on_nonfinite == "stop":
        stop = re.search(
            r"error: \[dpo\] step (\d+): non-finite loss, gradient norm", process.stderr
        )
        assert stop and int(stop.group(1)) >= 2, process.stderr
        assert "the update was not applied. Nothing non-finite was saved" in process.stderr
    else:
        assert "(skipped: 1 in a row)" in process.stderr
        assert "error: [dpo] 3 steps in a row were not finite" in process.stderr
    assert not (tmp_path / "hf").exists()  # no export
    _assert_checkpoints_finite(tmp_path / "dpo" / "checkpoints")


def _assert_checkpoints_finite(directory):
    import orbax.checkpoint as ocp

    steps = sorted(os.listdir(directory), key=int)
    assert steps, "the steps before the divergence were checkpointed"
    for step in steps:
        state = ocp.StandardCheckpointer().restore(directory / step / "state")
        leaves = [np.asarray(x) for x in _leaves(state["train_state"]["params"])]
        assert all(np.isfinite(leaf).all() for leaf in leaves), step


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.dpo.beta=-1"], "error: config.dpo (loss_type='sigmoid'): beta=-1"),
        (["--config.log.every_steps=0"], "error: config.log.every_steps=0 must be >= 1"),
        (
            ["--config.data.source=/nonexistent/pairs.jsonl"],
            "/nonexistent/pairs.jsonl",
        ),
    ],
)
def test_the_main_job_prints_one_line_and_exits_non_zero(tmp_path, flags, message):
    process = _train(tmp_path, *flags, timeout=300)
    assert process.returncode == 1
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    verbose = _train(tmp_path, *flags, "--verbose", timeout=300)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_a_collapsed_policy_warns_while_its_loss_looks_healthy(tmp_path):
    # At lr 1e6 the tiny model collapses by step 3 (grad_norm exactly 0, chosen and rejected
    # with identical log-probs, loss near log 2); its NaN steps are skipped here so it runs on.
    process = _train(
        tmp_path,
        "--config.sft.num_steps=0",
        "--config.dpo.num_steps=10",
        "--config.optimizer.learning_rate=1e6",
        "--config.guards.on_nonfinite=skip",
        "--config.guards.max_skipped_steps=100",
    )
    assert process.returncode == 0, process.stderr
    assert "warning: step" in process.stderr and "the policy looks collapsed" in process.stderr
    records = _train_records(tmp_path)
    assert any(r["grad_norm"] == 0.0 for r in records)
    assert all(abs(r["loss"] - np.log(2)) < 0.05 for r in records if np.isfinite(r["loss"]))
