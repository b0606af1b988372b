"""Files that are either complete or absent, readable by the user's group, and named when anything goes wrong.

A killed job must never leave a file that looks finished, so everything is written to a hidden file beside its
place (one fixed name per file, removed by the next run of its job) and renamed into place; files get the modes
the umask gives. Every reader goes through one error path that names the file. Checkpoints are pickles: they are
loaded with `weights_only=True`. One process runs a job at a time (`job_lock`). torch is imported by the
functions that need it, so that the table and figure jobs, which read and write files through this module, start
without it (about 2 s of each job's start on a CPU).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import platform
import socket
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd


# A write that failed for want of room (disk, quota, file size limit) or on a read-only file system, whatever layer
# it went through (torch's C++ writer, zipfile): reported as the OS error, naming the file, instead of e.g.
# "enforce fail at inline_container.cc"
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def partial_path(path: str | Path, suffix: str = "") -> Path:
    """Where `path` is written before it is renamed into place. One fixed name per file, so the next write of the
    file (or its job's start, `remove_partials`) removes what a killed writer left, however large."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial{suffix}")


def remove_partials(paths: list[str]) -> None:
    """Delete leftovers of killed writes of these files (a job calls this on its outputs when it starts)."""
    for path in paths:
        for stale in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.partial*"):
            stale.unlink(missing_ok=True)


class Busy(Exception):
    """Another process holds the lock of the job this one was asked to run."""


@contextmanager
def job_lock(config: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a job (by its config file) while it runs: a second `varkd` process on the same job
    stops at once instead of both writing its checkpoint and train_log.csv. The kernel drops the lock when the
    holder dies, kill -9 included, so a lock never outlives its job."""
    config = Path(config)
    lock = config.with_name(f".{config.name}.lock")
    with open(os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another process is running the job {config} (it holds {lock}); wait for it to end, "
                       "or end it") from None
        except OSError as err:  # a file system without locks (e.g. Lustre mounted without flock): run unguarded
            if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            print(f"warning: {lock}: the file system refuses locks ({err.strerror}); nothing stops a second "
                  "process on this job", file=sys.stderr)
        yield


def _os_error(err: BaseException) -> OSError | None:
    """The OS error behind a failed write, through the chain of exceptions that wrap it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file is created with the mode the umask gives (as `open` would; a mkstemp file would be 0600, unreadable by
    collaborators on shared storage). A write that fails for want of room raises an OSError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, suffix)
    tmp.unlink(missing_ok=True)  # a killed writer's leftover (never followed if it is a link)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        cause = _os_error(err)
        if cause is None:
            raise
        raise OSError(cause.errno, f"{os.strerror(cause.errno)}: could not write {path} (free space on its file "
                                   f"system: {_free_bytes(path.parent)})") from err
    finally:
        tmp.unlink(missing_ok=True)


def _free_bytes(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB"
    except OSError:
        return "unknown"


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    # through a file object: given a path, torch names the archive's records after the temporary file, so the
    # bytes would depend on its name
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


@contextmanager
def atomic_memmap(path: str | Path, shape: tuple[int, ...], dtype) -> Iterator[np.ndarray]:
    """A writable .npy memory map, filled in the block and renamed onto `path` only if the block succeeds.

    Its blocks are reserved up front: on a full disk this fails at once, naming the file, instead of killing the
    process (SIGBUS) when a page of the map is first written, after the compute that filled it.
    """
    with atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        with tmp.open("r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as err:
                if err.errno in WRITE_ERRNOS:
                    raise
                # EOPNOTSUPP / EINVAL: a file system without fallocate; the map is written as it is filled
        yield out
        out.flush()


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[Path]:
    """Every reader's one error path: a missing file, or anything that goes wrong reading it (a truncated .npz's
    BadZipFile, a foreign pickle, bad JSON or CSV), is an error naming the file and what it should be."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        yield path
    except Exception as err:
        raise ValueError(f"{what} {path} is corrupt or unreadable ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True and an error that names the file and what it should be."""
    import torch

    with reading(path, what):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_npz(path: str | Path, keys: list[str], what: str = "npz file") -> dict[str, np.ndarray]:
    with reading(path, what), np.load(path, allow_pickle=False) as f:
        missing = [k for k in keys if k not in f.files]
        if missing:
            raise KeyError(f"lacks arrays {missing} (has {f.files})")
        return {k: f[k] for k in keys}


def load_npy(path: str | Path, what: str, mmap_mode: str | None = None) -> np.ndarray:
    with reading(path, what):
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def load_json(path: str | Path, what: str) -> Any:
    with reading(path, what):
        return json.loads(Path(path).read_text())


def read_csv(path: str | Path, what: str) -> pd.DataFrame:
    with reading(path, what):
        return pd.read_csv(path)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def provenance(device: str = "cpu") -> dict:
    """Where and with what a result was made: commit, dirty tree, versions, host, device."""
    import omegaconf
    import torch
    import torch_fidelity

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "torch_fidelity": torch_fidelity.__version__,
        "omegaconf": omegaconf.__version__,
        "numpy": np.__version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
    }
