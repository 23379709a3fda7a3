"""Paths as URLs: local paths and gs:// (or any fsspec URL) through `etils.epath`.

A TPU pod's workers share no filesystem, so the workdir, the reference cache and the data may be
`gs://bucket/...`. Every file this codebase writes or reads outside orbax (which speaks gs://
through tensorstore itself) goes through these few functions, which hand the path to
`etils.epath` (gcsfs underneath for gs://): no HTTP is written here. Writes are atomic on both
kinds of storage: a local file is written beside its place and renamed over it, and an object is
replaced by a single upload, which an object store makes visible whole or not at all. An object
store cannot append, so a growing file (metrics.jsonl) is rewritten whole (`write_text`).

Pointing at a GCS emulator (the tests) is the libraries' own settings: STORAGE_EMULATOR_HOST for
gcsfs and google-cloud-storage, TENSORSTORE_GCS_HTTP_URL for tensorstore (orbax), and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false so that gcsfs does not probe a gRPC endpoint first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
    """`path` with `parts` appended, for local paths and URLs alike."""
    return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
    with naming(path, "lookup"):
        return epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_dir()


def make_dirs(path: str | os.PathLike) -> None:
    """Creates the directory and its parents (an object store has none to create)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def list_dir(path: str | os.PathLike) -> list[str]:
    """The names in a directory (or under a prefix), sorted."""
    return sorted(child.name for child in epath.Path(path).iterdir())


def size(path: str | os.PathLike) -> int:
    """The size of a file or object in bytes."""
    with naming(path, "lookup"):
        return epath.Path(path).stat().length


def modified_time(path: str | os.PathLike) -> float:
    """The last modification time of a file or object, seconds since the epoch."""
    return epath.Path(path).stat().mtime


@contextlib.contextmanager
def naming(path: str | os.PathLike, action: str) -> Iterator[None]:
    """Re-raises a storage library's error on `path` as one naming the URL and the action:
    gcsfs names the request ("b/bucket/o/name") or the endpoint, not the gs:// path. A missing
    object stays a FileNotFoundError. Nothing of the request's credentials is in the message."""
    try:
        yield
    except FileNotFoundError:
        if not is_remote(path):
            raise
        missing = "no such bucket" if action == "write" else "no such object"
        raise FileNotFoundError(f"{os.fspath(path)}: {missing} ({action})") from None
    except (OSError, ValueError, RuntimeError) as error:
        if not is_remote(path):
            raise
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise OSError(
            f"{os.fspath(path)}: {action} failed ({type(error).__name__}: {first})"
        ) from None
    except Exception as error:  # aiohttp's connection errors are not OSErrors
        if not is_remote(path) or "aiohttp" not in type(error).__module__:
            raise
        first = str(error).strip().splitlines()[0][:300]
        raise OSError(
            f"{os.fspath(path)}: {action} failed, storage unreachable ({first})"
        ) from None


def read_bytes(path: str | os.PathLike) -> bytes:
    with naming(path, "read"):
        return epath.Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see the module docstring); parents are created."""
    path = os.fspath(path)
    if is_remote(path):
        with naming(path, "write"):
            epath.Path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves a file or a directory tree. An object store has no rename: each object is copied,
    then the source is deleted, through epath, the backend orbax lists checkpoints with (so its
    listings see the move; gcsfs's own `mv` went through another cached instance)."""
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    source, target = epath.Path(source), epath.Path(target)
    if not source.is_dir():
        source.copy(target)
        source.unlink()
        return
    _copy_tree(source, target)
    source.rmtree()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    # epath refuses rglob on GCS (an RPC per level either way): walk it with iterdir.
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            item.copy(target / item.name)


def open_file(path: str | os.PathLike, mode: str = "rb") -> Any:
    """`open` for local paths and URLs (reading, or writing a new file)."""
    with naming(path, "open"):
        return epath.Path(path).open(mode)
