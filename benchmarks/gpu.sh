#!/usr/bin/env bash
# One command for a lent GPU: the decode engine and the real KD step (decode.py), evaluation's Inception pass
# (evaluate.py), then paper-scale KD-step and rollout throughput (paper_scale.py, torch only). varkd needs omegaconf
# and torch-fidelity, which the device image lacks: carry them as .deps, made here with
#   mkdir -p .deps && cp -r .venv/lib/python3.*/site-packages/{omegaconf,antlr4,torch_fidelity} .deps/
# and name .deps in the run's carry. Reports in $OUT/*.md, full log in $OUT/gpu.log. Extra arguments go to
# decode.py (e.g. --llamagen /path/to/LlamaGen).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=".:.deps" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/gpu.log"
python3 benchmarks/decode.py --out "$OUT/decode.md" "$@" 2>&1 | tee -a "$OUT/gpu.log"
python3 benchmarks/evaluate.py --out "$OUT/evaluate.md" 2>&1 | tee -a "$OUT/gpu.log"
# decode.py times the engine's GPT-B / GPT-XL rollouts: here only GPT-B's, beside its no-cache variant
python3 benchmarks/paper_scale.py --rollout-models GPT-B --out "$OUT/paper_scale.md" 2>&1 | tee -a "$OUT/gpu.log"
