"""The decode engine and the KD step at paper scale, side by side in one process on the same weights (a script,
not a test). Random-initialised LlamaGen c2i GPTs (vocab 16384, 256 tokens); token values do not change the cost.

    PYTHONPATH=. python3 benchmarks/decode.py --out decode.md                  # GPU, a few minutes
    PYTHONPATH=. python3 benchmarks/decode.py --smoke --out smoke.md           # CPU, tiny configs, a minute
    PYTHONPATH=. python3 benchmarks/decode.py --llamagen /path/to/LlamaGen     # + the public sampler, same weights

1. Rollouts, CFG (cond + null rows), bf16 weights, batch --rollout-batch images of 256 tokens:
   engine eager / engine compiled (`varkd.decode.Decoder`, compile=True: reduce-overhead, fullgraph) / SJD on the
   engine (eager) / with --llamagen, LlamaGen's own `generate()` eager and with its `--compile` (the model
   compiled reduce-overhead, fullgraph). Printed: ms per token step, images/s, ratio to the compiled reference,
   % of the bandwidth floor (weights + the filled KV prefix read once per step at the measured copy bandwidth),
   host syncs per step (torch.cuda.set_sync_debug_mode), compile time, peak memory, greedy-token agreement with
   the eager engine.
2. KD step: `varkd.steps.train.train_gpt` itself (GPT-B student, GPT-XL live teacher, forward KL on ground truth with
   confidence reweighting), a few logged steps per variant: bf16 / bf16 + loss_chunk / + torch.compile. Step time
   from train_log.csv; tokens/s; MFU as benchmarks/paper_scale.py counts model FLOPs. Needs omegaconf and tqdm
   (benchmarks/gpu.sh carries them).
Every variant is guarded: an error (CUDA OOM included) is reported in its row and the run goes on.
"""
from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from paper_scale import build, common_args, free_memory, guarded, kd_flops, model_config, peak_gib, reset_peak, sync, timed
from varkd.decode import Decoder, generate
from varkd.sampling import Sampling
from varkd.sjd import generate_sjd

REFERENCE_COMPILED_H100 = 342.6  # img/s, LlamaGen's compiled sampler, GPT-B, batch 256, CFG 2 (issue 17, H100)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the bound a decode step streams at."""
    n = 2**28 if device.type == "cuda" else 2**22
    src, dst = torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * 4 * n / seconds


def floor_images_per_s(model, images: int, bandwidth: float) -> float:
    """Images/s if every token step only streamed the bf16 weights and the filled half of the bf16 KV cache."""
    cfg = model.config
    weights = 2 * model.num_params()
    kv = 2 * 2 * cfg.n_layer * (2 * images) * cfg.dim * (cfg.block_size / 2)  # k and v, 2 rows per image
    return images / (cfg.block_size * (weights + kv) / bandwidth)


def count_syncs(fn, device: torch.device) -> int:
    """Synchronising CUDA calls made by fn (0 off the GPU: nothing to count)."""
    if device.type != "cuda":
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def llamagen_sampler(path: str, model, compile: bool):
    """LlamaGen's generate() on its own Transformer holding `model`'s weights (the key layouts match)."""
    sys.path.insert(0, path)
    from autoregressive.models.generate import generate as reference_generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    cfg = model.config
    ref = Transformer(ModelArgs(dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
                                num_classes=cfg.num_classes, block_size=cfg.block_size, cls_token_num=1,
                                model_type="c2i")).to(model.output.weight.device)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "cache" not in k] or unexpected:
        raise RuntimeError(f"LlamaGen keys differ: missing {missing}, unexpected {unexpected}")
    ref = ref.to(torch.bfloat16).eval()
    if compile:
        ref = torch.compile(ref, mode="reduce-overhead", fullgraph=True)

    def run(labels, cfg_scale, greedy=False):
        return reference_generate(ref, labels, cfg.block_size, cfg_scale=cfg_scale, temperature=1.0, top_k=0,
                                  top_p=1.0, sample_logits=not greedy)
    return run


def rollout_variant(args, model, variant: str, device: torch.device, greedy_ref) -> dict:
    images, repeats = args.rollout_batch, args.rollout_repeats
    labels = torch.arange(images, device=device) % model.config.num_classes
    if variant.startswith("llamagen"):
        ref = llamagen_sampler(args.llamagen, model, compile="compiled" in variant)
        run, greedy = (lambda: ref(labels, args.cfg_scale)), (lambda: ref(labels, args.cfg_scale, greedy=True))
    else:
        decoder = Decoder(model, torch.bfloat16, compile="compiled" in variant)
        sampled, argmax = Sampling(cfg_scale=args.cfg_scale), Sampling(cfg_scale=args.cfg_scale, temperature=0.0)
        if variant.startswith("sjd"):
            run = lambda: generate_sjd(decoder, labels, sampled, window=args.window)  # noqa: E731
            greedy = lambda: generate_sjd(decoder, labels, argmax, window=args.window)[0]  # noqa: E731
        else:
            run = lambda: generate(decoder, labels, sampled)  # noqa: E731
            greedy = lambda: generate(decoder, labels, argmax)  # noqa: E731
    reset_peak(device)
    first = timed(run, device)
    times = [timed(run, device) for _ in range(repeats)]
    seconds = statistics.median(times)
    tokens = greedy()
    out = {"images": images, "s_per_batch": seconds, "ms_per_step": 1000 * seconds / model.config.block_size,
           "images_per_s": images / seconds, "compile_s": max(0.0, first - seconds) if "compiled" in variant else None,
           "syncs_per_step": count_syncs(run, device) / model.config.block_size, "peak_gib": peak_gib(device)}
    if greedy_ref is not None:
        out["greedy_agreement"] = (tokens.to(greedy_ref.device) == greedy_ref).float().mean().item()
    return out, tokens


def rollout_section(args, device: torch.device, bandwidth: float) -> list[str]:
    variants = ["engine eager", "engine compiled", "sjd eager"]
    if args.llamagen:
        variants += ["llamagen eager", "llamagen compiled"]
    lines = [f"### Rollouts: CFG {args.cfg_scale}, batch {args.rollout_batch} images, bf16", "",
             "| model | variant | ms / step | images/s | vs reference | % of floor | syncs / step | compile s | "
             "peak GiB | greedy agreement |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.rollout_models.split(","):
        model = build(name, args, device).eval()
        floor = floor_images_per_s(model, args.rollout_batch, bandwidth)
        results, greedy_ref = {}, None
        for variant in variants:
            holder = {}

            def run(variant=variant):
                out, tokens = rollout_variant(args, model, variant, device, greedy_ref)
                holder["tokens"] = tokens
                return out
            results[variant] = guarded(f"{name} {variant}", run, device)
            if variant == "engine eager" and "tokens" in holder:
                greedy_ref = holder["tokens"]
        ref = results.get("llamagen compiled", {}).get("images_per_s") or REFERENCE_COMPILED_H100
        for variant, r in results.items():
            if "error" in r:
                lines.append(f"| {name} | {variant} | {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {name} | {variant} | {r['ms_per_step']:.2f} | {r['images_per_s']:.1f} | "
                         f"{r['images_per_s'] / ref:.2f}x | {100 * r['images_per_s'] / floor:.1f}% | "
                         f"{r['syncs_per_step']:.2f} | {r['compile_s'] or 0:.1f} | {r['peak_gib'] or 0:.1f} | "
                         f"{r.get('greedy_agreement', 1.0):.3f} |")
        free_memory(device)
    source = "LlamaGen compiled, measured above" if args.llamagen else \
        f"{REFERENCE_COMPILED_H100} img/s, LlamaGen compiled on an H100 (issue 17), not this card"
    lines += ["", f"Reference: {source}. Floor: bf16 weights + the filled half of the KV cache per token step at "
              f"the measured copy bandwidth {bandwidth / 1e12:.2f} TB/s.", ""]
    return lines


def kd_section(args, device: torch.device) -> list[str]:
    """train_gpt itself, a few steps per variant; step time from its log (steps after the warm-up ones)."""
    from varkd.checkpoints import save_model
    from varkd.codes import save_code_set
    from varkd.config import MethodConfig, OptimConfig, TermConfig, TrainJob, WeightingConfig
    from varkd.steps.train import train_gpt

    student_cfg, teacher_cfg = model_config(args.student, args.smoke), model_config(args.teacher, args.smoke)
    tmp = Path(tempfile.mkdtemp(prefix="varkd-bench-"))
    rng = np.random.default_rng(0)
    n = 4 * args.kd_batch
    for split in ("train", "val"):
        save_code_set(tmp / split, rng.integers(0, student_cfg.vocab_size, (n, 1, student_cfg.block_size)),
                      rng.integers(0, student_cfg.num_classes, n), vocab_size=student_cfg.vocab_size)
    teacher = build(args.teacher, args, torch.device("cpu"))
    save_model(tmp / "teacher.pt", teacher, teacher_cfg)
    kd = MethodConfig(terms=[TermConfig(divergence="fkl", weighting=WeightingConfig(reweight="confidence"))])
    student = build(args.student, args, torch.device("cpu"))
    flops = kd_flops(student, teacher, args.kd_batch * student_cfg.block_size, student_cfg.block_size)
    del teacher, student
    lines = [f"### KD step: train_gpt, student {args.student} <- live teacher {args.teacher}, batch {args.kd_batch}",
             "", "| variant | step ms | tokens/s | MFU | peak GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for variant, chunk, compile in (("bf16", 0, False), ("bf16 + loss_chunk", args.loss_chunk, False),
                                    ("bf16 + loss_chunk + compile", args.loss_chunk, True)):
        def run(chunk=chunk, compile=compile, variant=variant):
            out = tmp / variant.replace(" ", "_")
            steps = args.kd_warmup + args.kd_steps
            job = TrainJob(study="bench", backbone=args.student, method="fkl", seed=0, kd=kd, model=student_cfg,
                           optim=OptimConfig(steps=steps, batch_size=args.kd_batch, warmup_steps=0, log_every=1,
                                             checkpoint_every=10**6, compile=compile, loss_chunk=chunk),
                           codes_train=str(tmp / "train"), codes_val=str(tmp / "val"), out_dir=str(out),
                           teacher=str(tmp / "teacher.pt"))
            reset_peak(device)
            train_gpt(job, device)
            sync(device)
            elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(open(out / "train_log.csv"))]
            step_s = (elapsed[-1] - elapsed[args.kd_warmup - 1]) / args.kd_steps  # the log rounds to 10 ms
            return {"step_ms": 1000 * step_s, "tokens_per_s": args.kd_batch * student_cfg.block_size / step_s,
                    "mfu": flops / step_s / (args.peak_tflops * 1e12), "peak_gib": peak_gib(device)}
        r = guarded(f"kd {variant}", run, device)
        if "error" in r:
            lines.append(f"| {variant} | {r['error']} | | | |")
        else:
            lines.append(f"| {variant} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_gib'] or 0:.1f} |")
    lines += ["", "Step time: mean over the logged steps after the warm-up ones (train_log.csv elapsed_s, which "
              "includes the loop's NaN guard and logging). MFU: model FLOPs as benchmarks/paper_scale.py / "
              f"{args.peak_tflops} TFLOP/s.", ""]
    return lines


def parse_args():
    ap = common_args(__doc__.split("\n")[0], rollout_models="GPT-B,GPT-XL", cfg_scale=2.0, kd_warmup=3)
    ap.add_argument("--llamagen", help="a LlamaGen checkout: also time its generate() on the same weights")
    ap.add_argument("--window", type=int, default=16, help="SJD window")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--sections", default="rollouts,kd")
    args = ap.parse_args()
    if args.smoke:
        args.rollout_batch, args.rollout_repeats, args.kd_batch, args.kd_steps = 8, 1, 4, 2
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sections = [[f"## Decode engine and KD step, {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}", ""]]
    for section in args.sections.split(","):
        sections.append(rollout_section(args, device, bandwidth) if section == "rollouts" else kd_section(args, device))
        report = "\n".join(line for s in sections for line in s)
        if args.out:
            Path(args.out).write_text(report + "\n")
    print(report + f"\nTotal wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
