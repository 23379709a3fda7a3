"""Two processes on localhost (gloo, 4 CPU devices each) train as one process with 8 devices."""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from dpo_jax.models import init_params, save_hf
from dpo_jax.run import distributed, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train.py")
# The run: tiny model, 2 SFT + 4 DPO steps, a checkpoint every 2, precomputed reference, export.
OVERRIDES = {"dpo.reference": "precomputed", "dpo.num_steps": 4, "log.tensorboard": False}
METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm")
RUN_TIMEOUT_S = 900


def _tiny_config():
    spec = importlib.util.spec_from_file_location("default_config", f"{ROOT}/configs/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(workdir, num_processes: int, extra=(), per_process=None, timeout_s=30):
    """Runs scripts/train.py as `num_processes` processes; returns [(returncode, output)]."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=ROOT,
        PYTHONUNBUFFERED="1",
    )
    address = f"127.0.0.1:{_free_port()}"
    flags = [f"--config.{key}={value}" for key, value in OVERRIDES.items()] + list(extra)
    processes = []
    for process_id in range(num_processes):
        command = [sys.executable, SCRIPT, "--config=configs/default.py:tiny"]
        command += [f"--workdir={workdir}", f"--coordinator_address={address}"]
        command += [f"--num_processes={num_processes}", f"--process_id={process_id}"]
        command += [f"--distributed_timeout={timeout_s}", *flags]
        command += list((per_process or {}).get(process_id, ()))
        processes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
        results.append((process.returncode, output.decode()))
    return results


def _train_metrics(workdir, stage: str) -> dict[int, dict]:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if r.get("split", "train") == "train" and "loss" in r}


def _configured(overrides: dict):
    config = _tiny_config()
    for key, value in overrides.items():
        group, field = key.split(".")
        config[group][field] = value
    return config


def _hf_start(directory, overrides: dict) -> None:
    """An HF checkpoint of the tiny model (a random init), for the runs to load sharded."""
    _, model_config, _ = train.load_model(_configured(overrides), str(directory))
    params = init_params(model_config, jax.random.key(1))
    save_hf(str(directory), model_config, jax.device_get(params))


def test_two_processes_train_resume_and_export_as_one(tmp_path):
    # FSDP over all 8 devices (both processes): the loaded params and the optimizer state span
    # the hosts, so loading, checkpoints and the export all cross processes.
    main = {"model.source": "hf", "model.hf_path": str(tmp_path / "start"), "mesh.data": 1}
    main["mesh.fsdp"] = -1
    _hf_start(tmp_path / "start", OVERRIDES)  # the tiny model of source="random"
    extra = [f"--config.{key}={value}" for key, value in main.items()]
    two = tmp_path / "two_processes"
    first = _launch(two, 2, extra=extra)
    for returncode, output in first:
        assert returncode == 0, output[-3000:]
    losses_first = _train_metrics(two, "dpo")
    # A crash after step 2's checkpoint: step 4's checkpoint and the export are lost; the rerun
    # restores step 2 (SFT is complete) and replays steps 3 and 4.
    shutil.rmtree(two / "dpo" / "checkpoints" / "4")
    shutil.rmtree(two / "hf")
    second = _launch(two, 2, extra=extra)
    for returncode, output in second:
        assert returncode == 0, output[-3000:]
    assert "reference log-probs of" in second[0][1]  # the precomputed pass ran on resume too

    one = tmp_path / "one_process"
    train.train_and_evaluate(_configured({**OVERRIDES, **main}), str(one))
    for stage, steps in (("sft", (1, 2)), ("dpo", (1, 2, 3, 4))):
        expected, got = _train_metrics(one, stage), _train_metrics(two, stage)
        assert sorted(got) == list(steps), (stage, sorted(got))
        for step in steps:
            for name in METRICS:  # the same global batch in the same order gives these
                np.testing.assert_allclose(
                    got[step][name],
                    expected[step][name],
                    rtol=2e-5,
                    atol=1e-6,
                    err_msg=f"{stage} step {step} {name}",
                )
    for step in (1, 2, 3, 4):  # the replayed steps equal the first run's
        np.testing.assert_allclose(
            losses_first[step]["loss"], _train_metrics(two, "dpo")[step]["loss"], rtol=1e-6
        )
    exported, expected = (
        load_file(two / "hf" / "model.safetensors"),
        load_file(one / "hf" / "model.safetensors"),
    )
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_allclose(exported[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "extra, per_process, message",
    [
        ((), {1: ["--config.dpo.beta=0.2"]}, "process 1 has another config than process 0"),
        (["--config.mesh.data=3"], None, r"needs 3 devices but 8 are used \(2 process"),
    ],
    ids=["config_differs", "mesh_does_not_divide"],
)
def test_bad_multiprocess_starts_are_clear_errors(tmp_path, extra, per_process, message):
    results = _launch(tmp_path, 2, extra=extra, per_process=per_process)
    for returncode, output in results:
        assert returncode == 1, output[-3000:]
        assert re.search(message, output), output[-3000:]
        assert "Traceback" not in output


def test_unreachable_coordinator_times_out_with_a_clear_message(tmp_path):
    ((returncode, output),) = _launch(
        tmp_path, 1, per_process={0: ["--num_processes=2", "--process_id=1"]}, timeout_s=2
    )
    assert returncode == 1, output
    assert "could not reach the coordinator at 127.0.0.1:" in output
    assert "within 2 s" in output


def _handshake_all(hellos, timeout_s=20.0):
    """Runs `distributed.handshake` for each (num_processes, process_id, hash) in threads."""
    address = f"127.0.0.1:{_free_port()}"
    errors = {}

    def run(num_processes, process_id, digest):
        try:
            distributed.handshake(address, num_processes, process_id, digest, timeout_s)
        except distributed.DistributedError as error:
            errors[process_id] = str(error)

    threads = [threading.Thread(target=run, args=hello) for hello in hellos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_handshake_agrees_or_names_the_disagreement():
    assert _handshake_all([(3, 0, "a"), (3, 1, "a"), (3, 2, "a")]) == {}
    errors = _handshake_all([(2, 0, "a"), (3, 1, "a")])
    assert set(errors) == {0, 1}
    assert (
        "process 1 was started with --num_processes=3, process 0 with --num_processes=2"
        in (errors[1])
    )
    errors = _handshake_all([(2, 0, "a"), (2, 1, "b")])
    assert "process 1 has another config than process 0" in errors[0]
    errors = _handshake_all([(3, 0, "a"), (3, 1, "a")], timeout_s=2.0)  # process 2 never starts
    assert "processes [2] did not connect within 2.0 s" in errors[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="nohost"), "must be host:port"),
        (dict(coordinator_address="h:1", num_processes=0), "--num_processes=0 must be >= 1"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2"),
        (dict(mode="mpi"), "--distributed='mpi'"),
    ],
)
def test_bad_distributed_flags(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_config_hash_tells_configs_apart():
    base, other = _tiny_config(), _tiny_config()
    assert distributed.config_hash(base) == distributed.config_hash(other)
    other.dpo.beta = 0.2
    assert distributed.config_hash(base) != distributed.config_hash(other)


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """SLURM or a TPU preemption may signal one host first: the flags are all-reduced at log
    steps, so both processes save the same step and exit 0 (rerun to resume)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=ROOT,
    )
    address = f"127.0.0.1:{_free_port()}"
    flags = ["--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--num_processes=2"]
    flags += [f"--coordinator_address={address}", "--config.sft.num_steps=0"]
    flags += ["--config.dpo.num_steps=5000", "--config.log.every_steps=3"]
    flags += ["--config.checkpoint.every_steps=10000", "--config.checkpoint.export_hf=False"]
    processes = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *flags, f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        metrics = tmp_path / "dpo" / "metrics.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=RUN_TIMEOUT_S)[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    saved = []
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        found = re.search(r"received: saved step (\d+) to", output)
        assert found, output[-3000:]
        saved.append(int(found.group(1)))
    assert saved[0] == saved[1] and saved[0] % 3 == 0, saved
    assert "a stop signal (on another process) received" in outputs[0]
    assert "SIGTERM received" in outputs[1]
    assert (tmp_path / "dpo" / "checkpoints" / str(saved[0])).is_dir()


def test_detect_mode_reads_the_flags_and_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.detect_mode() == "none"  # this machine has no TPU chips
    assert distributed.detect_mode("10.0.0.1:8476") == "explicit"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_mode() == "none"  # a one-task job is one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detect_mode() == "slurm"


def test_each_process_reads_its_rows_of_the_one_process_batches():
    """The data order of the two-process run: process p's batch j is rows [p·B/2, (p+1)·B/2)
    of the one-process batch j, across an epoch boundary (64 records, batches of 8)."""
    from dpo_jax.data import synthetic
    from dpo_jax.data.pipeline import make_pair_iterator

    records = synthetic.make_records(64, seed=0, split="train")
    tokenizer = synthetic.make_tokenizer()
    options = dict(batch_size=8, max_length=18, max_prompt_length=10, seed=0)
    whole = make_pair_iterator(records, tokenizer, process_index=0, process_count=1, **options)[0]
    halves = [
        make_pair_iterator(records, tokenizer, process_index=p, process_count=2, **options)[0]
        for p in range(2)
    ]
    for _ in range(10):  # 8 batches a epoch: the second epoch's reshuffle included
        expected = next(whole)
        parts = [next(half) for half in halves]
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)


def test_a_sequence_axis_across_the_two_processes_equals_one_process(tmp_path):
    # sequence = 8 over both processes' 4 devices: every row is split across the hosts, so the
    # two processes form one row group, read the same (whole) rows, and each device takes its 4
    # of the 32 tokens (`sharding.row_group`, `put_batch`); the precomputed reference pass too.
    split = {"mesh.data": 1, "mesh.sequence": 8, "data.max_length": 32}
    extra = [f"--config.{key}={value}" for key, value in split.items()]
    two = tmp_path / "two_processes"
    for returncode, output in _launch(two, 2, extra=extra):
        assert returncode == 0, output[-3000:]
    one = tmp_path / "one_process"  # whole rows, data-parallel over 8 devices
    train.train_and_evaluate(_configured({**OVERRIDES, "data.max_length": 32}), str(one))
    for stage, steps in (("sft", (1, 2)), ("dpo", (1, 2, 3, 4))):
        expected, got = _train_metrics(one, stage), _train_metrics(two, stage)
        assert sorted(got) == list(steps), (stage, sorted(got))
        for step in steps:
            for name in METRICS:
                np.testing.assert_allclose(
                    got[step][name], expected[step][name], rtol=2e-5, atol=1e-6,
                    err_msg=f"{stage} step {step} {name}",
                )  # fmt: skip
