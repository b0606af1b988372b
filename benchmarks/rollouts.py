"""Rollout cost: AR `generate` against SJD `generate_sjd` on the embedded student and teacher (a script, not a test).

    python benchmarks/rollouts.py [--student CKPT] [--teacher CKPT] [--device cpu|cuda] [--batch 64] [--threads 1]

Without a checkpoint the model is random-initialised with output weights N(0, (output_scale / sqrt(dim))^2), so the
logits have a standard deviation of about output_scale and the next-token distributions are far from uniform
(LlamaGen zero-inits the output layer, which would make every distribution uniform). SJD's acceptance depends on
how peaked and how context-dependent the distributions are, so random-model numbers only measure the mechanics;
use trained checkpoints for representative speed-ups. Every time is the median of `--repeats` runs after one
warm-up, all in this process.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from varkd.checkpoints import load_gpt
from varkd.decode import generate
from varkd.models.gpt import GPT, GPTConfig
from varkd.sampling import Sampling, cfg_logits, filter_logits
from varkd.sjd import INITS, generate_sjd

SHARED = dict(vocab_size=256, num_classes=10, block_size=64, multiple_of=32, dropout_p=0.0, token_dropout_p=0.0)
EMBEDDED = {
    "student": dict(dim=64, n_layer=2, n_head=2, **SHARED),
    "teacher": dict(dim=192, n_layer=3, n_head=3, **SHARED),
}
WINDOWS = (4, 8, 16)


def build(name: str, checkpoint: str | None, output_scale: float, device: str) -> GPT:
    if checkpoint:
        return load_gpt(checkpoint, f"{name} checkpoint").to(device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**EMBEDDED[name]))
    torch.nn.init.normal_(model.output.weight, std=output_scale / math.sqrt(model.config.dim))
    return model.to(device).eval()


def timed(fn, device: str, repeats: int):
    """(median seconds over `repeats` runs after one warm-up, the last result)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def entropy(model: GPT, seq: torch.Tensor, labels: torch.Tensor, sampling: Sampling) -> float:
    """Mean entropy (nats) of the sampler's next-token distributions along the given sequences."""
    logits = model(seq[:, :-1], labels)
    if sampling.guided:
        logits = cfg_logits(logits, model(seq[:, :-1], torch.full_like(labels, model.config.num_classes)),
                            sampling.cfg_scale)
    logp = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).log_softmax(-1)
    return -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1).mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", help="student checkpoint (default: random init)")
    ap.add_argument("--teacher", help="teacher checkpoint (default: random init)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--output-scale", type=float, default=4.0, help="logit std of a random-initialised model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampling = Sampling(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch}, {sampling}, "
          f"median of {args.repeats} after a warm-up")
    header = f"{'model':<8} {'source':<10} {'H':>5} {'method':<6} {'window':>6} {'init':<15} {'s/batch':>8} " \
             f"{'fwd/img':>7} {'iters':>5} {'SJD/AR':>6}"
    print(header)
    print("-" * len(header))
    for name in ("student", "teacher"):
        checkpoint = getattr(args, name)
        model = build(name, checkpoint, args.output_scale, args.device)
        source = "checkpoint" if checkpoint else "random"
        labels = torch.arange(args.batch, device=args.device) % model.config.num_classes
        T = model.config.block_size
        g = torch.Generator(args.device).manual_seed(0)
        ar_time, seq = timed(lambda: generate(model, labels, sampling, generator=g), args.device, args.repeats)
        h = entropy(model, seq, labels, sampling)
        print(f"{name:<8} {source:<10} {h:5.2f} {'AR':<6} {'-':>6} {'-':<15} {ar_time:8.3f} {T:7.1f} {T:5d} {1:6.2f}")
        for window in WINDOWS:
            for init in INITS:
                t, (_, stats) = timed(lambda: generate_sjd(model, labels, sampling, window=window, init=init,
                                                           generator=g), args.device, args.repeats)
                print(f"{name:<8} {source:<10} {h:5.2f} {'SJD':<6} {window:6d} {init:<15} {t:8.3f} "
                      f"{stats['forward_passes_per_image']:7.1f} {stats['iterations']:5d} {t / ar_time:6.2f}")


if __name__ == "__main__":
    main()
