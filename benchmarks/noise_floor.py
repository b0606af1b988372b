"""How much FID and the other sample metrics move with the sampling seed alone, against the number of samples.

One model (a study's student init or teacher), K sampling seeds per sample count, each set scored against the
study's test images exactly as a run's samples are (varkd.steps.evaluate.RealSide). The standard deviation over
seeds is the noise floor a single evaluation carries; it chooses sample.num_samples (config/config.yaml).

    python benchmarks/noise_floor.py results/embedded --model tiny/student_init --counts 500 1000 2000 --seeds 5
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from varkd.config import EvaluateConfig, SampleConfig
from varkd.steps.evaluate import RealSide
from varkd.steps.sample import NOISE_STREAM, balanced_labels, draw_images, load_sampler, sample_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a study's results folder, e.g. results/embedded")
    parser.add_argument("--model", default="tiny/student_init", help="run folder holding the checkpoint")
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root, cpu = Path(args.results), torch.device("cpu")
    run = root / args.model
    checkpoint = next(p for p in (run / "student.pt", run / "teacher.pt") if p.is_file())
    model, vq = load_sampler(str(checkpoint), str(root / "data/tokenizer/tokenizer.pt"), cpu)
    real = RealSide(EvaluateConfig(), str(root / "data/images.npz"), str(root / "data/classifier/classifier.pt"))
    print(f"{checkpoint}, cfg {args.cfg_scale}, {args.seeds} sampling seeds per count, against the test split")
    print(f"{'samples':>8} {'FID mean':>9} {'FID sd':>7} {'IS sd':>6} {'prec sd':>8} {'rec sd':>7} {'s/set':>6}")
    for count in args.counts:
        cfg = SampleConfig(num_samples=count, batch_size=1000, cfg_scale=args.cfg_scale)
        labels = balanced_labels(model.config.num_classes, count)
        sets, start = [], time.perf_counter()
        for k in range(args.seeds):
            images = draw_images(model, vq, labels, cfg, sample_seed(0, cfg, NOISE_STREAM, 100 + k), cpu)
            sets.append(real.score(images, "test", cpu, 0))
        seconds = (time.perf_counter() - start) / args.seeds
        sd = {m: np.std([s[m] for s in sets], ddof=1) for m in ("fid", "isc_mean", "precision", "recall")}
        print(f"{count:>8} {np.mean([s['fid'] for s in sets]):>9.3f} {sd['fid']:>7.3f} {sd['isc_mean']:>6.3f} "
              f"{sd['precision']:>8.4f} {sd['recall']:>7.4f} {seconds:>6.1f}")


if __name__ == "__main__":
    main()
