"""Steps that import LlamaGen's released files (varkd.checkpoints) as varkd checkpoints: a c2i GPT, the tokenizer."""
from __future__ import annotations

import torch

from varkd.checkpoints import load_llamagen_gpt, load_llamagen_vq, save_model
from varkd.config import ImportGPTJob, ImportTokenizerJob


def import_gpt(job: ImportGPTJob, device: torch.device) -> None:
    """`varkd import-gpt`: a released c2i file, loaded strictly, rewritten with its config as a varkd checkpoint
    (teacher.pt or student_init/student.pt), so every later job loads it like a model the workflow trained."""
    model = load_llamagen_gpt(job.path, job.size, job.image_size)
    save_model(job.out, model, model.config, imported_from=str(job.path))
    print(f"{job.out}: {job.size} at {job.image_size}px from {job.path}")


def import_tokenizer(job: ImportTokenizerJob, device: torch.device) -> None:
    """`varkd import-tokenizer`: the released tokenizer rewritten as a varkd tokenizer checkpoint."""
    model = load_llamagen_vq(job.path, job.name)
    save_model(job.out, model, model.config, imported_from=str(job.path))
    print(f"{job.out}: {job.name} from {job.path}")
