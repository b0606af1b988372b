#!/usr/bin/env bash
# One command for a lent GPU (needs only torch): paper-scale KD-step and rollout throughput,
# report in $OUT/paper_scale.md, full log in $OUT/paper_scale.log. Extra arguments go to paper_scale.py.
# benchmarks/rollouts.py is not run here: it imports varkd.checkpoints -> varkd.config -> omegaconf.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/paper_scale.log"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/paper_scale.py --out "$OUT/paper_scale.md" "$@" 2>&1 \
    | tee -a "$OUT/paper_scale.log"
