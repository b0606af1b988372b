"""varkd: knowledge distillation for visual autoregressive image models (the VarKD study as a Snakemake workflow)."""
import os

# Checkpoints are pickles, and a pickle runs code when it is loaded. varkd loads its own files with
# weights_only=True; this makes every torch.load in a process that imports varkd do so too, the ones libraries make
# for us included (torch-fidelity loads the Inception weights with weights_only=False).
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
