"""Code sets: the token sequences the GPTs train on, a folder that training memory-maps (so ImageNet fits).

codes.npy [N, A, T] holds A augmented views of each image (LlamaGen's ten-crop, or the image once) and
labels.npy int64 [N] its class (`varkd.config.code_set_files`). codes.npy is written first and labels.npy last,
each atomically, and a rewrite removes labels.npy first: a killed writer never leaves a set that looks complete.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from varkd.config import code_set_files
from varkd.io import atomic_memmap, atomic_path, load_npy


def code_dtype(vocab_size: int) -> np.dtype:
    """int16 when every code fits in it (half the disk and page cache of int32 at ImageNet scale)."""
    return np.dtype(np.int16 if vocab_size <= 2**15 else np.int32)


@contextmanager
def code_set_writer(folder: str | Path, labels: np.ndarray, num_views: int, length: int,
                    dtype: np.dtype) -> Iterator[np.ndarray]:
    """Yield a writable memory map [N, A, T] for codes.npy; the set lands only if the block succeeds."""
    codes_path, labels_path = code_set_files(str(folder))
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"code set {folder}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    Path(labels_path).unlink(missing_ok=True)  # an older set in the folder no longer looks complete
    with atomic_memmap(codes_path, (len(labels), num_views, length), dtype) as codes:
        yield codes
    with atomic_path(labels_path, suffix=".npy") as tmp:
        np.save(tmp, labels.astype(np.int64))


def save_code_set(folder: str | Path, codes: np.ndarray, labels: np.ndarray, vocab_size: int) -> None:
    """An in-memory code set [N, A, T] to `folder`."""
    codes = np.asarray(codes)
    if codes.ndim != 3 or len(codes) != len(labels):
        raise ValueError(f"code set {folder}: codes must be [N, A, T] with N = {len(labels)} labels, "
                         f"got {codes.shape}")
    if codes.size and not 0 <= codes.min() <= codes.max() < vocab_size:
        raise ValueError(f"code set {folder}: codes span [{codes.min()}, {codes.max()}], vocabulary {vocab_size}")
    with code_set_writer(folder, labels, codes.shape[1], codes.shape[2], code_dtype(vocab_size)) as out:
        out[:] = codes


class CodeSet:
    """Codes [N, A, T] (a memory map, or an array in tests) and labels; batches come out as int64 tensors."""

    def __init__(self, codes: np.ndarray, labels: np.ndarray, source: str):
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{source}: codes must be an integer array [N, A, T], got {codes.dtype} {codes.shape}")
        if labels.shape != (len(codes),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{source}: labels {labels.dtype} {labels.shape} do not match {len(codes)} code rows")
        if len(codes) == 0:
            raise ValueError(f"{source}: holds no sequences")
        self.codes, self.source = codes, source
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.N, self.A, self.T = codes.shape

    def __len__(self) -> int:
        return self.N

    def batch(self, index: np.ndarray, views: Optional[np.ndarray] = None) -> torch.Tensor:
        """Rows `index`, each at its view (None: view 0, the un-augmented image), as a LongTensor [B, T]."""
        index = np.asarray(index)
        views = np.zeros_like(index) if views is None else np.asarray(views)
        order = np.argsort(index, kind="stable")  # sorted reads are much faster on a memory map
        rows = self.codes[index[order], views[order]]
        out = np.empty(rows.shape, dtype=np.int64)
        out[order] = rows
        return torch.from_numpy(out)

    def code_range(self, chunk: int = 4096) -> tuple[int, int]:
        """Smallest and largest code, a chunk of rows at a time (no int64 copy of a memory-mapped ImageNet)."""
        lows, highs = [], []
        for i in range(0, self.N, chunk):
            rows = np.asarray(self.codes[i : i + chunk])
            lows.append(rows.min())
            highs.append(rows.max())
        return int(min(lows)), int(max(highs))


def load_code_set(folder: str | Path) -> CodeSet:
    """The code set in `folder`, codes memory-mapped; a missing or unreadable file is named."""
    files = zip(code_set_files(str(folder)), ("r", None))
    arrays = [load_npy(path, f"code set {folder}:", mmap) for path, mmap in files]
    return CodeSet(*arrays, source=f"code set {folder}")
