"""Paper-scale throughput: a KD training step (GPT-B student, GPT-XL teacher) and CFG rollouts, each optimised path
against a naive one in the same process (a script, not a test). Models are random-initialised LlamaGen c2i GPTs
(vocab 16384, 1000 classes, 256 image tokens = 16x16 grid); token values do not change the cost.

    PYTHONPATH=. python3 benchmarks/paper_scale.py --out paper_scale.md      # GPU, a few minutes
    PYTHONPATH=. python3 benchmarks/paper_scale.py --smoke --out smoke.md    # CPU, tiny configs, seconds

Needs only torch and varkd.models.gpt / varkd.losses / varkd.sampling / varkd.decode (no omegaconf).

1. KD step: teacher forward under torch.no_grad on a batch of random sequences, student forward, forward KL
   (teacher || student) over the full vocabulary (varkd.losses), backward, grad-norm clip 1.0, AdamW step.
   (a) naive: fp32 student and teacher (TF32 off, the PyTorch default), math SDPA backend;
   (b) bf16: student under bf16 autocast, teacher weights cast to bf16, flash / memory-efficient SDPA only;
   (c) compiled: (b) with torch.compile of student, teacher and loss, run in a child process that is killed if
       it outlives --compile-budget (plus a fixed allowance for start-up and timing).
   The batch starts at --kd-batch sequences and halves on CUDA OOM. MFU uses model FLOPs (see `kd_flops`).
2. Rollouts: class-conditional generation with CFG (conditional + null rows, 2x batch), bf16 weights.
   (a) kv-cache: varkd.decode.generate, timed end to end;
   (b) no-cache: generate's use_cache=False step (a full causal forward over the prefix), timed at
       --naive-points prefix lengths spread over the sequence; the total is the sum over all steps of the linear
       interpolation between them, and for --naive-full models also measured end to end as a check.
3. Environment: device, torch version, and an 8192^3 bf16 matmul TFLOP/s reading.

Every variant is guarded: an error (CUDA OOM included) is reported in its row and the run goes on. The markdown
report is printed and rewritten to --out after every section.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from varkd import losses
from varkd.decode import decoding_labels, generate
from varkd.models.gpt import GPT, GPTConfig, gpt_config
from varkd.sampling import Sampling, cfg_logits, sample

SMOKE_SHARED = dict(vocab_size=512, num_classes=10, block_size=16, multiple_of=32)
SMOKE_MODELS = {  # stand-ins for the registry sizes under --smoke
    "GPT-B": dict(dim=64, n_layer=2, n_head=2),
    "GPT-L": dict(dim=96, n_layer=2, n_head=3),
    "GPT-XL": dict(dim=128, n_layer=3, n_head=4),
}
MATH = [SDPBackend.MATH]
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
KD_VARIANTS = {  # name: (bf16, SDPA backends, torch.compile)
    "naive fp32": (False, MATH, False),
    "bf16": (True, FUSED, False),
    "bf16 + compile": (True, FUSED, True),
}
CHILD_SLACK_S = 45  # start-up, model build and timing of the compiled child, on top of the compile budget
RESULT_TAG = "KD_CHILD_RESULT "


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def model_config(name: str, smoke: bool) -> GPTConfig:
    """LlamaGen registry config (LlamaGen's dropout defaults), or a tiny stand-in under --smoke."""
    return GPTConfig(**SMOKE_MODELS[name], **SMOKE_SHARED) if smoke else gpt_config(name)


def build(name: str, args, device: torch.device) -> GPT:
    torch.manual_seed(0)
    with device:
        model = GPT(model_config(name, args.smoke))
    model.freqs_cis = model.freqs_cis.to(device)  # moved once here, not inside the first (compiled) forward
    return model


def matmul_params(model: GPT) -> int:
    """Parameters that take part in matmuls: all but the token and class embedding tables (lookups)."""
    tables = model.tok_embeddings.weight.numel() + model.cls_embedding.embedding_table.weight.numel()
    return model.num_params() - tables


def attention_flops_per_token(cfg: GPTConfig, context: int) -> int:
    """Forward FLOPs of QK^T and AV for one query over `context` keys in all layers, full square (not halved for
    the causal mask, as PaLM's MFU): 2 matmuls x 2 FLOPs x context x dim per layer."""
    return 4 * cfg.n_layer * cfg.dim * context


def kd_flops(student: GPT, teacher: GPT, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one KD step: 6 N_s + 3 attn_s per token (student forward + backward) and
    2 N_t + attn_t per token (teacher forward); N = matmul parameters (embedding tables excluded)."""
    s = 6 * matmul_params(student) + 3 * attention_flops_per_token(student.config, seq_len)
    t = 2 * matmul_params(teacher) + attention_flops_per_token(teacher.config, seq_len)
    return float(tokens * (s + t))


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def fit_batch(run, start: int, device: torch.device):
    """run(batch) at batch start, start/2, ... until it does not run out of CUDA memory -> (batch, result)."""
    batch = start
    while batch >= 1:
        try:
            return batch, run(batch)
        except torch.cuda.OutOfMemoryError:
            print(f"    OOM at batch {batch}, halving", flush=True)
        free_memory(device)
        batch //= 2
    raise RuntimeError("out of memory even at batch 1")


def guarded(label: str, fn, device: torch.device, show: bool = True) -> dict:
    """fn() -> dict, or {"error": ...} if it raised; memory is freed either way. show: print the result."""
    print(f"  {label} ...", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one variant must not end the run (CUDA OOM included)
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"}
    free_memory(device)
    result["wall_s"] = time.perf_counter() - start
    print(f"  {label}: " + (json.dumps(result) if show else f"done in {result['wall_s']:.1f} s"), flush=True)
    return result


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


# ---------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------
def matmul_tflops(n: int, device: torch.device, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / seconds / 1e12


def environment(args, device: torch.device) -> list[str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        name = platform.processor() or "cpu"
    n = 512 if args.smoke else 8192
    lines = [
        f"- device: {device} ({name}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"python {platform.python_version()}",
        f"- bf16 matmul {n}^3: {matmul_tflops(n, device):.1f} TFLOP/s (mean of 10 after 2 warm-ups)",
        f"- MFU peak: --peak-tflops {args.peak_tflops:g} TFLOP/s (default 989 = H100/H200 SXM dense bf16)",
    ]
    if args.smoke:
        lines.append("- SMOKE RUN: tiny stand-in configs, numbers mean nothing")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# 1. KD step
# ---------------------------------------------------------------------------------------------------------------
def kd_variant(args, device: torch.device, variant: str, start_batch: int) -> dict:
    """Build student + teacher for one variant, fit the batch, time --kd-steps steps after --kd-warmup."""
    bf16, backends, compiled = KD_VARIANTS[variant]
    reset_peak(device)
    student, teacher = build(args.student, args, device).train(), build(args.teacher, args, device).eval()
    teacher.requires_grad_(False)
    if bf16:
        teacher.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)

    def loss_fn(student_logits, teacher_logits):
        return losses.reduce(losses.forward_kl(student_logits, teacher_logits))

    run_student, run_teacher, run_loss = student, teacher, loss_fn
    if compiled:
        run_student, run_teacher, run_loss = (torch.compile(f, backend=args.compile_backend, dynamic=False)
                                              for f in (student, teacher, loss_fn))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(tokens, labels):
        with sdpa_kernel(backends):
            with torch.no_grad():
                teacher_logits = run_teacher(tokens[:, :-1], labels)
            with autocast():
                student_logits = run_student(tokens[:, :-1], labels)
            loss = run_loss(student_logits, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()

    def run(batch):
        cfg = student.config
        tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
        labels = torch.randint(cfg.num_classes, (batch,), device=device)
        first = timed(lambda: step(tokens, labels), device)
        if compiled and first > args.compile_budget:
            return {"first_step_s": first, "error": f"compile took {first:.0f} s > budget {args.compile_budget} s"}
        for _ in range(args.kd_warmup - 1):
            step(tokens, labels)
        times = [timed(lambda: step(tokens, labels), device) for _ in range(args.kd_steps)]
        return {"first_step_s": first, "step_s": statistics.median(times)}

    batch, out = fit_batch(run, start_batch, device)
    out.update(batch=batch, peak_gib=peak_gib(device))
    if "step_s" in out:
        seq_len = student.config.block_size  # [cls, x_0..x_{T-2}]: T positions, each predicting one token
        tokens = batch * seq_len
        flops = kd_flops(student, teacher, tokens, seq_len)
        out.update(tokens_per_s=tokens / out["step_s"], tflops=flops / out["step_s"] / 1e12,
                   flops_per_step=flops)
        out["mfu"] = out["tflops"] / args.peak_tflops
        if compiled:
            out["compile_s"] = out["first_step_s"] - out["step_s"]
    return out


def kd_compiled_in_child(args, start_batch: int) -> dict:
    """Variant (c) in a child process (own process group), killed when it outlives budget + slack."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child-kd-batch", str(start_batch)]
    limit = args.compile_budget + CHILD_SLACK_S
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"skipped: killed after {limit} s (compile budget {args.compile_budget} s "
                         f"+ {CHILD_SLACK_S} s start-up/timing)"}
    results = [json.loads(line[len(RESULT_TAG):]) for line in output.splitlines() if line.startswith(RESULT_TAG)]
    if not results or "error" in results[-1]:
        print("    child output (tail):\n" + "\n".join("    | " + line for line in output.splitlines()[-40:]))
    if results:
        return results[-1]
    return {"error": f"child exited {proc.returncode} without a result (its output is in the log)"}


def kd_section(args, device: torch.device) -> dict:
    results = {}
    for variant in KD_VARIANTS:
        if KD_VARIANTS[variant][2]:
            if args.compile_budget <= 0:
                results[variant] = {"error": "skipped: --compile-budget 0"}
                continue
            start = results["bf16"].get("batch", args.kd_batch)
            results[variant] = guarded(f"kd {variant}", lambda: kd_compiled_in_child(args, start), device)
        else:
            results[variant] = guarded(f"kd {variant}", lambda: kd_variant(args, device, variant, args.kd_batch),
                                       device)
    return results


def kd_report(args, results: dict) -> list[str]:
    base = results["naive fp32"].get("tokens_per_s")
    lines = [
        f"## 1. KD step: student {args.student} (AdamW, forward KL over the full vocabulary) + frozen teacher "
        f"{args.teacher}",
        "",
        f"Random tokens and labels; {args.kd_warmup} warm-up step(s), median of {args.kd_steps} timed steps "
        "(each synchronised). Student in train mode (LlamaGen dropout 0.1), teacher in eval mode under "
        "torch.no_grad in every variant (without it the loss would backpropagate into the teacher).",
        "",
        "| variant | batch (seqs) | step ms | tokens/s | model TFLOP/s | MFU | peak GiB | speed-up vs naive | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for variant, r in results.items():
        notes = []
        if KD_VARIANTS[variant][2] and "first_step_s" in r:
            compile_s = r.get("compile_s", r["first_step_s"])
            notes.append(f"first step {r['first_step_s']:.1f} s, so compile ~{compile_s:.1f} s "
                         f"({args.compile_backend})")
        if "error" in r:
            notes.append(f"**{r['error']}**")
        step = r.get("step_s")
        speedup = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
        mfu = r.get("mfu")
        lines.append(
            f"| {variant} | {r.get('batch', '-')} | {fmt(step and step * 1e3)} | {fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(r.get('tflops'))} | {fmt(mfu and 100 * mfu, '.1f', '%')} | {fmt(r.get('peak_gib'))} | "
            f"{fmt(speedup, '.2f', 'x')} | {'; '.join(notes)} |"
        )
    T = model_config(args.student, args.smoke).block_size
    flops = next((r["flops_per_step"] / r["batch"] for r in results.values() if "flops_per_step" in r), None)
    lines += [
        "",
        f"Tokens per step = batch x {T} positions ([cls, x_0..x_{T - 2}], each predicting one token). Model FLOPs "
        "per token = 6 N_s + 2 N_t (N = matmul parameters: embedding tables excluded, output head included) plus "
        f"attention 4 x n_layer x dim x {T} per forward (QK^T and AV over the full {T}x{T} square, not halved for "
        "causality), x3 for the student's forward + backward. "
        + (f"That is {flops / 1e9:.1f} GFLOP per sequence. " if flops else "")
        + f"MFU = model TFLOP/s / {args.peak_tflops:g} (bf16 dense peak, also for the fp32 variant, whose own "
        "ceiling is far lower). Peak GiB = torch.cuda.max_memory_allocated over the variant.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# 2. Rollouts
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def naive_step(model: GPT, seq: torch.Tensor, cond: torch.Tensor, n: int, cfg_scale: float):
    """generate(use_cache=False) step n: forward over [cls; x_0..x_{n-1}] for all 2B rows, CFG, sample x_n."""
    B = seq.shape[0]
    x = seq[:, :n]
    logits = model(torch.cat([x, x]), cond)[:, -1]
    seq[:, n] = sample(cfg_logits(logits[:B], logits[B:], cfg_scale))


def interpolated_total(points: dict[int, float], steps: int) -> float:
    """Sum over n = 0..steps-1 of the per-step time, linearly interpolated between the measured prefix lengths."""
    known = sorted(points)
    total = 0.0
    for n in range(steps):
        hi = next(k for k in known if k >= n)
        lo = max(k for k in known if k <= n)
        total += points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (n - lo) / (hi - lo)
    return total


def rollout_cached(args, model: GPT, device: torch.device) -> dict:
    reset_peak(device)

    def run(batch):
        labels = torch.randint(model.config.num_classes, (batch,), device=device)
        go = lambda: generate(model, labels, Sampling(cfg_scale=args.cfg_scale))  # noqa: E731
        go()  # warm-up
        return statistics.median(timed(go, device) for _ in range(args.rollout_repeats))

    batch, seconds = fit_batch(run, args.rollout_batch, device)
    T = model.config.block_size
    return {"batch": batch, "batch_s": seconds, "ms_per_step": seconds / T * 1e3, "images_per_s": batch / seconds,
            "peak_gib": peak_gib(device), "how": f"measured, median of {args.rollout_repeats} after 1 warm-up"}


def rollout_naive(args, model: GPT, name: str, device: torch.device) -> dict:
    reset_peak(device)
    T = model.config.block_size
    lengths = sorted({round(i * (T - 1) / (args.naive_points - 1)) for i in range(args.naive_points)})

    def run(batch):
        labels = torch.randint(model.config.num_classes, (batch,), device=device)
        cond, _ = decoding_labels(model, labels, args.cfg_scale)
        seq = torch.randint(model.config.vocab_size, (batch, T), device=device)
        points = {}
        for n in reversed(lengths):  # longest first: an OOM shows up at once
            naive_step(model, seq, cond, n, args.cfg_scale)  # warm-up
            points[n] = statistics.median(
                timed(lambda: naive_step(model, seq, cond, n, args.cfg_scale), device) for _ in range(3))
        return points

    batch, points = fit_batch(run, args.rollout_batch, device)
    seconds = interpolated_total(points, T)
    out = {"batch": batch, "batch_s": seconds, "ms_per_step": seconds / T * 1e3, "images_per_s": batch / seconds,
           "how": f"estimated: steps timed at prefix lengths {lengths} (median of 3), linearly interpolated "
                  f"(step 0 {points[0] * 1e3:.1f} ms, step {T - 1} {points[T - 1] * 1e3:.1f} ms)"}
    if name in args.naive_full:
        labels = torch.randint(model.config.num_classes, (batch,), device=device)
        out["measured_batch_s"] = timed(
            lambda: generate(model, labels, Sampling(cfg_scale=args.cfg_scale), use_cache=False), device)
        out["how"] += f"; full run measured: {out['measured_batch_s']:.2f} s"
    out["peak_gib"] = peak_gib(device)
    return out


def rollout_model(args, name: str, device: torch.device) -> dict:
    model = build(name, args, device).to(torch.bfloat16).eval()
    results = {
        "kv-cache": guarded(f"rollout {name} kv-cache", lambda: rollout_cached(args, model, device), device),
        "no-cache": guarded(f"rollout {name} no-cache", lambda: rollout_naive(args, model, name, device), device),
    }
    return results


def rollout_section(args, device: torch.device) -> dict:
    results = {}
    for name in args.rollout_models:
        results[name] = guarded(f"rollout {name}", lambda: rollout_model(args, name, device), device, show=False)
    return results


def rollout_report(args, results: dict) -> list[str]:
    lines = [
        f"## 2. Rollouts: class-conditional generation with CFG {args.cfg_scale:g} (2 rows per image), bf16 weights",
        "",
        f"Requested batch {args.rollout_batch} images (halved on OOM); temperature 1, top-k off; default SDPA "
        "dispatch. kv-cache = varkd.decode.generate; no-cache = its use_cache=False step (full causal forward "
        "over the prefix every step).",
        "",
        "| model | variant | batch (images) | ms / token step | s / batch | images/s | cache speed-up | peak GiB "
        "| how |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, per_model in results.items():
        if "kv-cache" not in per_model:  # the model could not be built
            lines.append(f"| {name} | - | - | - | - | - | - | - | **{per_model['error']}** |")
            continue
        cached, naive = per_model["kv-cache"], per_model["no-cache"]
        speedup = cached["images_per_s"] / naive["images_per_s"] if "error" not in cached and "error" not in naive \
            else None
        for variant, r in (("kv-cache", cached), ("no-cache", naive)):
            how = f"**{r['error']}**" if "error" in r else r["how"]
            lines.append(
                f"| {name} | {variant} | {r.get('batch', '-')} | {fmt(r.get('ms_per_step'), '.2f')} | "
                f"{fmt(r.get('batch_s'), '.2f')} | {fmt(r.get('images_per_s'), '.1f')} | "
                f"{fmt(speedup if variant == 'kv-cache' else None, '.1f', 'x')} | {fmt(r.get('peak_gib'))} | {how} |"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def common_args(description: str, *, rollout_models: str, cfg_scale: float, kd_warmup: int) -> argparse.ArgumentParser:
    """The options this script and benchmarks/decode.py share (report, device, models, batch sizes, steps)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", help="markdown report file (rewritten after every section)")
    ap.add_argument("--smoke", action="store_true", help="tiny configs and few steps, for a CPU check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100/H200 SXM dense bf16)")
    ap.add_argument("--student", default="GPT-B")
    ap.add_argument("--teacher", default="GPT-XL")
    ap.add_argument("--kd-batch", type=int, default=32, help="first batch tried (sequences); halved on OOM")
    ap.add_argument("--kd-warmup", type=int, default=kd_warmup)
    ap.add_argument("--kd-steps", type=int, default=5)
    ap.add_argument("--rollout-models", default=rollout_models)
    ap.add_argument("--rollout-batch", type=int, default=256, help="images (2x rows with CFG); halved on OOM")
    ap.add_argument("--rollout-repeats", type=int, default=2)
    ap.add_argument("--cfg-scale", type=float, default=cfg_scale)
    return ap


def parse_args():
    ap = common_args(__doc__.split("\n")[0], rollout_models="GPT-B,GPT-XL,GPT-L", cfg_scale=4.0, kd_warmup=2)
    ap.add_argument("--compile-budget", type=float, default=120.0, help="seconds; 0 skips the compiled variant")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager "
                                                            "under --smoke)")
    ap.add_argument("--naive-points", type=int, default=9, help="prefix lengths timed for the no-cache estimate")
    ap.add_argument("--naive-full", default="GPT-B", help="models whose no-cache rollout is also run end to end")
    ap.add_argument("--child-kd-batch", type=int, help=argparse.SUPPRESS)  # internal: run variant (c) only
    args = ap.parse_args()
    if args.naive_points < 2:
        ap.error("--naive-points must be at least 2 (the first and the last step)")
    if args.smoke:
        torch.set_num_threads(1)  # tiny models; leaves the other core alone
        args.kd_batch, args.kd_steps, args.kd_warmup, args.rollout_batch = min(args.kd_batch, 4), 2, 1, 4
        args.rollout_repeats, args.naive_points = 1, 4
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    args.rollout_models = [m for m in args.rollout_models.split(",") if m]
    args.naive_full = [m for m in args.naive_full.split(",") if m]
    return args


def write_report(args, sections: list[list[str]]):
    text = "\n\n".join("\n".join(s) for s in sections) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.child_kd_batch is not None:
        result = guarded("kd bf16 + compile (child)",
                         lambda: kd_variant(args, device, "bf16 + compile", args.child_kd_batch), device)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    sections = [["# Paper-scale throughput (benchmarks/paper_scale.py)", "", *environment(args, device)]]
    print("\n".join(sections[0]), flush=True)
    write_report(args, sections)
    sections.append(kd_report(args, kd_section(args, device)))
    write_report(args, sections)
    sections.append(rollout_report(args, rollout_section(args, device)))
    sections.append([f"Total wall time {time.perf_counter() - start:.0f} s."])
    print("\n" + write_report(args, sections), flush=True)


if __name__ == "__main__":
    main()
