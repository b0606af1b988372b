"""Model files: `{"model": state_dict, "config": {...}, ...}` (LlamaGen's layout plus the config to rebuild it).

Loading is strict: a missing, unexpected or mis-shaped key is an error that lists them and names the file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import torch

from varkd.config import structured
from varkd.io import atomic_torch_save, load_checkpoint

M = TypeVar("M", bound=torch.nn.Module)


def save_model(path: str | Path, model: torch.nn.Module, config: Any, **meta: Any) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(path, {"model": state, "config": dataclasses.asdict(config), **meta})


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"mis-shaped {shapes}" if shapes else ""]
        raise ValueError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def load_model(path: str | Path, config_cls: type, model_cls: type[M], what: str) -> tuple[M, dict]:
    """Rebuild `model_cls(config)` from a file written by `save_model`; returns the model and the whole file."""
    ckpt = load_checkpoint(path, what)
    for key in ("model", "config"):
        if key not in ckpt:
            raise ValueError(f"{what} {path} has no '{key}' entry (keys: {sorted(ckpt)})")
    config = structured(config_cls, ckpt["config"], f"{what} {path}")
    model = model_cls(config)
    load_state_strict(model, ckpt["model"], f"{what} {path}")
    return model, ckpt


def load_gpt(path: str | Path, what: str = "GPT checkpoint"):
    from varkd.models.gpt import GPT, GPTConfig

    model, _ = load_model(path, GPTConfig, GPT, what)
    return model.eval()


def load_vq(path: str | Path):
    from varkd.models.vq import VQConfig, VQModel

    model, _ = load_model(path, VQConfig, VQModel, "tokenizer checkpoint")
    return model.eval()


def load_classifier(path: str | Path):
    from varkd.classifier import Classifier, ClassifierConfig

    model, _ = load_model(path, ClassifierConfig, Classifier, "classifier checkpoint")
    return model.eval()
