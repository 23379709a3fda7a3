"""Multi-controller start-up: `jax.distributed` from flags or the environment, checked to agree.

One process runs per host (per GPU node, per TPU VM worker). `initialize` is called before
anything touches a device; it picks the start-up from the arguments and the environment:

- an explicit `coordinator_address` (host:port of process 0), `num_processes` and `process_id`;
- SLURM (`srun`): the job's variables give all three (jax reads them);
- a TPU VM: `jax.distributed.initialize()` with no arguments (jax asks the TPU metadata);
- otherwise one process, nothing to initialise.

`jax.distributed` aborts the whole process (a C++ fatal error, no Python exception) when the
coordinator cannot be reached or the processes disagree on their number, so with an explicit
address the processes first shake hands over plain TCP on the coordinator's port: process 0
listens, the others connect within `timeout_s` and send their process id, process count and a
hash of the config; any disagreement or absence is a `DistributedError` naming it, on every
process that can be told. Afterwards (every start-up) the config hash is all-gathered through
jax and compared again, and the mesh is checked against the global devices.
"""

import glob
import hashlib
import importlib.util
import json
import os
import socket
import time

import jax
import ml_collections

from dpo_jax import sharding

MODES = ("auto", "none", "explicit", "slurm", "tpu")
_HANDSHAKE_BYTES = 1 << 16


class DistributedError(ValueError):
    """The processes of a run cannot start together (unreachable, disagreeing, mis-sized)."""


def config_hash(config: ml_collections.ConfigDict | None) -> str:
    """sha256 of the config's JSON (keys sorted): equal on processes with the same config."""
    if config is None:
        return ""
    text = config.to_json_best_effort(sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def detect_mode(coordinator_address: str = "") -> str:
    """The start-up the environment asks for: explicit, slurm, tpu or none (see module doc)."""
    if coordinator_address:
        return "explicit"
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    # TPU chips appear as /dev/accel* (v4, v5e) or /dev/vfio/* (v5p, v6e); libtpu drives them.
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    if chips and has_libtpu and "TPU_SKIP_MDS_QUERY" not in os.environ:
        return "tpu"
    return "none"


def initialize(
    *,
    mode: str = "auto",
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    timeout_s: int = 300,
    config: ml_collections.ConfigDict | None = None,
) -> str:
    """Starts `jax.distributed` as `mode` asks, then checks the processes agree.

    Call before anything touches a jax device (jax.devices(), an array, a jit).

    Args:
      mode: one of MODES; "auto" = `detect_mode(coordinator_address)`.
      coordinator_address: "host:port" of process 0 (explicit mode).
      num_processes: the number of processes (explicit mode), >= 1.
      process_id: this process, in [0, num_processes) (explicit mode).
      timeout_s: how long to wait for the coordinator / the other processes, in seconds.
      config: the run's config; its hash must be equal on every process, and its mesh must
        divide the global devices.

    Returns:
      The mode that was used ("none" when single-process).

    Raises:
      DistributedError: a bad argument, a coordinator not reached within `timeout_s`, processes
        that disagree on their number or on the config, or a mesh that does not fit.
    """
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}; allowed: {MODES}")
    if mode == "auto":
        mode = detect_mode(coordinator_address)
    if timeout_s < 1:
        raise DistributedError(f"--distributed_timeout={timeout_s} must be >= 1 second")
    digest = config_hash(config)
    if mode != "none":  # CPU devices need a collectives implementation across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "explicit":
        _check_explicit(coordinator_address, num_processes, process_id)
        handshake(coordinator_address, num_processes, process_id, digest, timeout_s)
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    elif mode in ("slurm", "tpu"):
        method = {"slurm": "slurm", "tpu": None}[mode]
        jax.distributed.initialize(
            cluster_detection_method=method, initialization_timeout=timeout_s
        )
    if mode == "none":  # one process: sharding.make_mesh checks the mesh as always
        return mode
    check_agreement(digest, num_processes if mode == "explicit" else jax.process_count())
    if config is not None:
        check_mesh(mesh_sizes(config.mesh), config.mesh.num_devices)
    return mode


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int) -> None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"--coordinator_address={coordinator_address!r} must be host:port (process 0's host)"
        )
    if num_processes < 1:
        raise DistributedError(
            f"--num_processes={num_processes} must be >= 1 with --coordinator_address"
        )
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
        )


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def handshake(
    coordinator_address: str, num_processes: int, process_id: int, digest: str, timeout_s: float
) -> None:
    """Before jax starts: every process reaches process 0 and agrees with it (see module doc).

    Raises:
      DistributedError: the coordinator was not reached (or not every process reached it)
        within `timeout_s`, or a process disagrees on the process count, its id or the config.
    """
    if num_processes == 1:
        return
    hello = {"process_id": process_id, "num_processes": num_processes, "config_hash": digest}
    if process_id == 0:
        _serve_handshake(coordinator_address, hello, timeout_s)
    else:
        _join_handshake(coordinator_address, hello, timeout_s)


def _disagreement(mine: dict, theirs: dict, seen: set[int]) -> str | None:
    other = theirs.get("process_id")
    if theirs.get("num_processes") != mine["num_processes"]:
        return (
            f"process {other} was started with --num_processes={theirs.get('num_processes')}, "
            f"process 0 with --num_processes={mine['num_processes']}"
        )
    if not isinstance(other, int) or not 0 < other < mine["num_processes"] or other in seen:
        return f"--process_id={other} is out of range or used twice (ids already seen: {seen})"
    if theirs.get("config_hash") != mine["config_hash"]:
        return (
            f"process {other} has another config than process 0 (config sha256 "
            f"{str(theirs.get('config_hash'))[:12]} vs {mine['config_hash'][:12]}): start every "
            "process with the same --config and overrides"
        )
    return None


def _serve_handshake(coordinator_address: str, hello: dict, timeout_s: float) -> None:
    _, port = _split_address(coordinator_address)
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    error, connections = None, 0
    with socket.create_server(("", port)) as server:
        server.settimeout(1.0)
        while connections < hello["num_processes"] - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, hello["num_processes"])) - seen)
                error = error or (
                    f"processes {missing} did not connect within {timeout_s} s "
                    "(--distributed_timeout); were they started, with this --coordinator_address, "
                    "and can they reach this host and port?"
                )
                break
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:  # every process that connects is told the first problem found
                connection.settimeout(max(deadline - time.monotonic(), 1.0))
                theirs = json.loads(connection.recv(_HANDSHAKE_BYTES).decode() or "{}")
                error = error or _disagreement(hello, theirs, seen)
                connection.sendall(json.dumps({"error": error}).encode())
                seen.add(theirs.get("process_id"))
                connections += 1
    if error:
        raise DistributedError(f"coordinator {coordinator_address}: {error}")


def _join_handshake(coordinator_address: str, hello: dict, timeout_s: float) -> None:
    host, port = _split_address(coordinator_address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=1.0)
            break
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {hello['process_id']}: could not reach the coordinator at "
                    f"{coordinator_address} within {timeout_s} s (--distributed_timeout; last "
                    f"error: {error}); is process 0 running, and is that host and port reachable "
                    "from here?"
                ) from None
            time.sleep(0.5)
    with connection:
        connection.settimeout(max(deadline - time.monotonic(), 1.0))
        connection.sendall(json.dumps(hello).encode())
        reply = json.loads(connection.recv(_HANDSHAKE_BYTES).decode() or "{}")
    if reply.get("error"):
        raise DistributedError(f"process {hello['process_id']}: {reply['error']}")


def check_agreement(digest: str, num_processes: int) -> None:
    """All-gathers (config hash, process count) through jax and compares them across processes.

    Raises:
      DistributedError: naming the processes whose config or count differs from process 0's.
    """
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest or "0" * 64), np.uint8).astype(np.int32)
    local = np.concatenate([mine, [num_processes, jax.process_count()]]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, 34]
    differ = [i for i in range(len(gathered)) if not np.array_equal(gathered[i], gathered[0])]
    if differ:
        raise DistributedError(
            f"processes {differ} disagree with process 0 on the config or the process count "
            f"(each process's count: {gathered[:, -2].tolist()}, jax sees {jax.process_count()})"
        )


def mesh_sizes(mesh_config) -> dict[str, int]:
    """{axis: size} of a config.mesh group (its data, fsdp, sequence and tensor fields)."""
    return {axis: mesh_config[axis] for axis in sharding.MESH_AXES}


def check_mesh(sizes: dict[str, int], num_devices: int) -> None:
    """The config's mesh must use every global device (every process takes part).

    Raises:
      DistributedError: naming the mesh, the processes and their devices.
    """
    total, processes = jax.device_count(), jax.process_count()
    where = f"{processes} process(es) × {jax.local_device_count()} local devices = {total}"
    if processes > 1 and num_devices != -1:
        raise DistributedError(
            f"config.mesh.num_devices={num_devices}: with several processes the mesh must use "
            f"all {where} devices (set -1)"
        )
    try:
        sharding.resolve_mesh_shape(sizes, total if num_devices == -1 else num_devices)
    except ValueError as error:
        raise DistributedError(f"{error} ({where})") from None
