"""Files that are either complete or absent: atomic writes, safe checkpoint loading, provenance.

A killed job must never leave a file that looks finished, so everything is written to a temporary file in
the same folder and renamed into place. Checkpoints are pickles: they are loaded with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    # through a file object: given a path, torch names the archive's records after the (random) temporary file,
    # so two saves of the same object would differ in bytes
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


@contextmanager
def atomic_memmap(path: str | Path, shape: tuple[int, ...], dtype) -> Iterator[np.ndarray]:
    """A writable .npy memory map, filled in the block and renamed onto `path` only if the block succeeds."""
    with atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield out
        out.flush()


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True and an error that names the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"{what} {path} is corrupt or not a torch checkpoint: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_npz(path: str | Path, keys: list[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise KeyError(f"{path} lacks arrays {missing} (has {f.files})")
            return {k: f[k] for k in keys}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or not an npz file: {err}") from None


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
