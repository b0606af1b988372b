"""varkd: knowledge distillation for visual autoregressive image models (the VarKD study as a Snakemake workflow).

Three layers, each importing only the ones below it: the library modules (models/, losses, decode, loop, metrics,
features, data, codes, config, study, ...); varkd.steps, what each workflow job does (one function per command);
varkd.cli on top, mapping `varkd <command> job.yaml` to its step.
"""
import os

# Checkpoints are pickles, and a pickle runs code when it is loaded. varkd loads its own files with
# weights_only=True; this makes every torch.load in a process that imports varkd do so too, the ones libraries make
# for us included (torch-fidelity loads the Inception weights with weights_only=False).
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
