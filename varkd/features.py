"""Extractor features of uint8 images at the extractor's speed, and the real side's features stored once.

A feature pass is where an evaluation spends its time at paper scale (Inception at 299 x 299 over 50,000 samples per
run): batches of images go from pinned host memory to the device without a sync, as NHWC arrays viewed as NCHW
(channels_last, no transpose copy), and the features stay on the device until scored. Float32 with TF32 off by
default, so a card's defaults cannot move a reported metric.

The real side is the same for every run of a study: `varkd real-features` extracts it once per split (or once for
ADM's reference batch) into a features file that every evaluation reads (`save_features` / `load_features`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from varkd.io import atomic_save_npz, load_npz

INFO = ("feature_extractor", "protocol", "weights", "source")  # what a features file says it was made from


@contextlib.contextmanager
def float32_precision(tf32: bool) -> Iterator[None]:
    """cuDNN convolutions and matmuls in float32 (tf32=False) or TensorFloat-32, restored afterwards. cuDNN's
    default is TF32: without this, the features would depend on the card and on what the process set before."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def extract_features(extractor: torch.nn.Module, images_NHWC: np.ndarray, batch_size: int, device: torch.device,
                     tf32: bool = False) -> dict[str, torch.Tensor]:
    """Every layer the torch-fidelity extractor was built for: {layer: [N, D] float32 on `device`}, one pass over
    uint8 NHWC images in batches of batch_size. Rows of a read-only array are copied per batch, never the whole set."""
    device = torch.device(device)
    extractor = extractor.to(device, memory_format=torch.channels_last)
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(), float32_precision(tf32):
        for start in range(0, len(images_NHWC), batch_size):
            rows = np.require(images_NHWC[start : start + batch_size], requirements=["C", "W"])
            batch = torch.from_numpy(rows)
            if device.type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
            out = extractor.convert_features_tuple_to_dict(extractor(batch.permute(0, 3, 1, 2)))
            for layer, features in out.items():
                parts.setdefault(layer, []).append(features)
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


class UInt8Images(torch.utils.data.Dataset):
    """uint8 NHWC array -> uint8 CHW tensors: an array as torch-fidelity's own loop takes it (calculate_metrics,
    extract_featuresdict_from_input_id), for checking numbers against torch-fidelity itself (tests,
    benchmarks/evaluate.py, notebooks)."""

    def __init__(self, images_NHWC: np.ndarray):
        self.images = images_NHWC

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def save_features(path: str | Path, features: dict[str, torch.Tensor], image_shape: tuple[int, ...],
                  **info: str) -> None:
    """{layer: [N, D]} as float32 arrays, the shape of the images they came from ([N, H, W, 3]) and what they were
    made from (INFO), written atomically. Layer names such as "mixed_6/conv" are not npz keys: arrays are stored by
    position, their names in `layers`."""
    missing = set(INFO) - set(info)
    if missing:
        raise ValueError(f"save_features needs {sorted(missing)}")
    arrays = {f"layer{i}": f.float().cpu().numpy() for i, f in enumerate(features.values())}
    atomic_save_npz(path, layers=np.array(list(features)), image_shape=np.array(image_shape, dtype=np.int64),
                    **arrays, **{k: np.array(v) for k, v in info.items()})


def load_features(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """A features file: ({layer: [N, D] float32 on `device`}, {"image_shape": (N, H, W, 3), INFO key: value})."""
    head = load_npz(path, ["layers", "image_shape", *INFO], "features file")
    layers = [str(name) for name in head["layers"]]
    arrays = load_npz(path, [f"layer{i}" for i in range(len(layers))], "features file")
    features = {name: torch.from_numpy(arrays[f"layer{i}"]).to(device) for i, name in enumerate(layers)}
    return features, {"image_shape": tuple(int(n) for n in head["image_shape"]), **{k: str(head[k]) for k in INFO}}
