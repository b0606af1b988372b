"""npz files too large to hold in memory: np.savez's layout written one member at a time, and member headers and
chosen rows read without loading the rest.

An npz is a zip of `.npy` members (uncompressed as np.savez writes it). 50,000 samples at 256px are 9.8 GB, so
gathering sample shards streams each shard into the `arr_0` member instead of concatenating them first; the file
loads with `np.load` exactly like `np.savez` output (same member names, npy header, zip64 entries).
"""
from __future__ import annotations

import math
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from varkd.io import atomic_path

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpzWriter:
    """Members of an open npz, each written whole (`write`) or as a stream of chunks along axis 0 (`stream`)."""

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self._zip, self._path = zf, path

    def write(self, key: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        self.stream(key, array.shape, array.dtype, [array.reshape(-1, *array.shape[1:])])  # a 0-d array as (1,)

    def stream(self, key: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]) -> None:
        """Member `key` of the given shape and dtype, from chunks whose concatenation along axis 0 is the array."""
        dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
        if dtype.hasobject:
            raise TypeError(f"{self._path}[{key}]: object arrays need pickling, which npz files here never hold")
        expected, written = math.prod(shape) * dtype.itemsize, 0
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                    raise ValueError(f"{self._path}[{key}]: chunk {chunk.dtype} {chunk.shape} does not fit an array "
                                     f"{dtype} {shape}")
                written += chunk.nbytes
                if written > expected:
                    break
                f.write(chunk.reshape(-1).view(np.uint8))
                del chunk  # freed before the next one is made: one chunk in memory at a time
        if written != expected:
            raise ValueError(f"{self._path}[{key}]: chunks hold {written} bytes, an array {dtype} {shape} needs "
                             f"{expected}")


@contextmanager
def npz_writer(path: str | Path) -> Iterator[NpzWriter]:
    """An npz at `path`, complete or absent: written beside it and renamed into place when the block succeeds."""
    with atomic_path(path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            yield NpzWriter(zf, Path(path))


def _read_header(f, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the npy header at the start of member `key`, open as `f`."""
    version = np.lib.format.read_magic(f)
    if version not in _HEADER_READERS:
        raise ValueError(f"{path}[{key}]: npy format version {version} is not supported")
    shape, fortran_order, dtype = _HEADER_READERS[version](f)
    return tuple(shape), fortran_order, np.dtype(dtype)


@contextmanager
def _members(path: str | Path, keys: list[str]) -> Iterator[zipfile.ZipFile]:
    """The npz at `path`, open, checked to hold `keys`; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            missing = [k for k in keys if k not in names]
            if missing:
                raise KeyError(f"{path} lacks arrays {missing} (has {names})")
            yield zf
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is corrupt or not an npz file: {err}") from None


def npz_headers(path: str | Path, keys: list[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each member in `keys`, read from the npy headers alone; errors name the file and key."""
    with _members(path, keys) as zf:
        out = {}
        for key in keys:
            with zf.open(f"{key}.npy") as f:
                shape, _, dtype = _read_header(f, Path(path), key)
                out[key] = (shape, dtype)
        return out


def npz_rows(path: str | Path, key: str, rows: Iterable[int]) -> np.ndarray:
    """Rows `rows` (indices along axis 0) of member `key`, read one by one: a figure showing a few of 50,000 samples
    reads those (a seek each in an uncompressed npz), not the 9.8 GB array."""
    path, rows = Path(path), [int(i) for i in rows]
    with _members(path, [key]) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran_order, dtype = _read_header(f, path, key)
        if fortran_order or not shape:
            raise ValueError(f"{path}[{key}]: rows of a {'Fortran-order' if shape else '0-d'} array cannot be read")
        bad = [i for i in rows if not 0 <= i < shape[0]]
        if bad:
            raise IndexError(f"{path}[{key}]: rows {bad[:5]} outside its {shape[0]}")
        size, start = math.prod(shape[1:]) * dtype.itemsize, f.tell()
        out = np.empty((len(rows), *shape[1:]), dtype)
        for j, i in enumerate(rows):
            f.seek(start + i * size)
            out[j] = np.frombuffer(f.read(size), dtype).reshape(shape[1:])
        return out
