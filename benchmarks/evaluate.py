"""Evaluation throughput: Inception-v3 features of uint8 images, side by side in one process on the same images (a
script, not a test).

    PYTHONPATH=. python3 benchmarks/evaluate.py --out evaluate.md           # GPU: 10,000 images of 256 x 256
    PYTHONPATH=. python3 benchmarks/evaluate.py --smoke                     # CPU: 64 images of 64 x 64, a minute
    ... --weights /path/to/weights-inception-2015-12-05-6726825d.pth        # the real network (else random weights)

Variants: torch-fidelity's own loop (a DataLoader of CHW copies, batches of 64, features copied to the host per
batch: the pass evaluations took before varkd.features), and varkd.features.extract_features (pinned batches,
NHWC viewed as channels_last, features kept on the device) in float32 and in TF32, at --batch. Printed: images/s,
ratio to torch-fidelity's loop, peak memory, the largest feature difference to varkd's float32 pass, and FID between
two image sets through each variant with its difference to varkd's float32 FID (the goal: >= 2,000 img/s with the
reported FID unmoved). Without --weights the network has random (He-initialised) weights: the cost is the real one,
FIDs are not comparable with published ones, their differences still show what a variant's arithmetic moves.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import numpy as np
import torch
import torch_fidelity.feature_extractor_inceptionv3 as inception
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.utils import extract_featuresdict_from_input_id

from varkd.features import UInt8Images, extract_features, float32_precision
from varkd.metrics import feature_statistics

LAYERS = ["2048", "logits_unbiased"]  # FID / precision / recall, and IS: what an evaluation extracts


def network(weights: str | None, device: torch.device) -> inception.FeatureExtractorInceptionV3:
    """torch-fidelity's Inception from a local file, or with random weights (no file is ever downloaded)."""
    if weights:
        fe = inception.FeatureExtractorInceptionV3("inception-v3-compat", LAYERS, feature_extractor_weights_path=weights)
    else:
        with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
                mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
            torch.manual_seed(0)
            fe = inception.FeatureExtractorInceptionV3("inception-v3-compat", LAYERS)
        for module in fe.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)  # features stay O(1) through ~40 layers
    return fe.requires_grad_(False).eval().to(device)


def images(n: int, size: int, seed: int, shift: int = 0) -> np.ndarray:
    """Smooth random images (8 x 8 noise, upsampled): structure for the network to see, unlike pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) + shift
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def torch_fidelity_loop(fe, x: np.ndarray, device: torch.device, batch: int) -> dict[str, torch.Tensor]:
    with float32_precision(tf32=True) if device.type == "cuda" else contextlib.nullcontext():  # cuDNN's default
        return extract_featuresdict_from_input_id(1, fe, input1=UInt8Images(x), cuda=device.type == "cuda",
                                                  batch_size=64, save_cpu_ram=True, verbose=False)


def varkd_pass(tf32: bool):
    return lambda fe, x, device, batch: extract_features(fe, x, batch, device, tf32=tf32)


VARIANTS = {"torch-fidelity loop, batch 64 (cuDNN TF32 default)": torch_fidelity_loop,
            "varkd.features float32": varkd_pass(False),
            "varkd.features TF32": varkd_pass(True)}
BASE, OURS = "torch-fidelity loop, batch 64 (cuDNN TF32 default)", "varkd.features float32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    out = fid_statistics_to_metric({"mu": mu1.astype(np.float64), "sigma": s1},
                                   {"mu": mu2.astype(np.float64), "sigma": s2}, verbose=False)
    return float(out["frechet_inception_distance"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", help="torch-fidelity's Inception weights file (else random weights)")
    parser.add_argument("--images", type=int, default=10000, help="images per set (two sets)")
    parser.add_argument("--size", type=int, default=256, help="image side (samples are 256 x 256 at paper scale)")
    parser.add_argument("--batch", type=int, default=250, help="varkd.features batch (evaluate.batch_size)")
    parser.add_argument("--smoke", action="store_true", help="64 images of 64 x 64: checks the script on a CPU")
    parser.add_argument("--out", help="also write the report here (markdown)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.size = 64, 64
    device = torch.device(args.device)
    fe = network(args.weights, device)
    sets = images(args.images, args.size, seed=1), images(args.images, args.size, seed=2, shift=8)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"device {name}, torch {torch.__version__}, {args.images} + {args.images} images of {args.size} x "
             f"{args.size}, varkd batch {args.batch}, weights {args.weights or 'random (He)'}"]
    rows = {}
    for variant, run in VARIANTS.items():
        run(fe, sets[0][: 2 * args.batch], device, args.batch)  # warm-up: cuDNN picks its algorithms
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        features = [run(fe, x, device, args.batch) for x in sets]
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows[variant] = {"img_s": 2 * args.images / seconds, "peak_gib": peak,
                         "features": [{k: v.double().cpu() for k, v in f.items()} for f in features]}
        rows[variant]["fid"] = fid(*(f["2048"] for f in rows[variant]["features"]))
    ours = rows[OURS]
    lines.append(f"{'variant':52s} {'img/s':>8s} {'x loop':>7s} {'peak GiB':>9s} {'max |df|':>9s} {'FID':>12s} "
                 f"{'FID - fp32':>11s}")
    for variant, row in rows.items():
        diff = max((row["features"][i][k] - ours["features"][i][k]).abs().max().item()
                   for i in range(2) for k in LAYERS)
        lines.append(f"{variant:52s} {row['img_s']:8.0f} {row['img_s'] / rows[BASE]['img_s']:7.2f} "
                     f"{row['peak_gib']:9.2f} {diff:9.2e} {row['fid']:12.6f} {row['fid'] - ours['fid']:+11.2e}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"```\n{report}\n```\n")


if __name__ == "__main__":
    main()
