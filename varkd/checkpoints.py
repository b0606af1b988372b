"""Model files: `{"model": state_dict, "config": {...}, ...}` (LlamaGen's layout plus the config to rebuild it),
and the official LlamaGen files, which hold only weights: the config comes from the registry size instead.

Loading is strict: a missing, unexpected or mis-shaped key is an error that lists them and names the file.
Nothing is ever downloaded: a missing official file is an error that says where to get it.
"""
from __future__ import annotations

import argparse
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


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                      assign: bool = False) -> None:
    """Load `state` into `model` if the keys and shapes match exactly, else raise an error listing every mismatch.

    assign=True lets the model be built on the meta device: its tensors become the file's (cast to the model's
    dtypes) instead of being copied into allocated ones, so a 3B model is never held twice in memory.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"mis-shaped {shapes}" if shapes else ""]
        raise ValueError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    if assign:
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=assign)


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


# ----------------------------------------------------------------------------------------------------------------
# Official LlamaGen files (FoundationVision/LlamaGen on Hugging Face, MIT licence)
# ----------------------------------------------------------------------------------------------------------------
LLAMAGEN_URL = "https://huggingface.co/FoundationVision/LlamaGen"
# The released c2i GPT files by (registry size, image size). The weights do not depend on the image size (RoPE is
# computed, not stored), so this table is what tells a c2i_B_256.pt from a c2i_B_384.pt.
LLAMAGEN_GPT_FILES = {
    ("GPT-B", 256): "c2i_B_256.pt",
    ("GPT-B", 384): "c2i_B_384.pt",
    ("GPT-L", 256): "c2i_L_256.pt",
    ("GPT-L", 384): "c2i_L_384.pt",
    ("GPT-XL", 384): "c2i_XL_384.pt",
    ("GPT-XXL", 384): "c2i_XXL_384.pt",
    ("GPT-3B", 384): "c2i_3B_384.pt",
}
LLAMAGEN_VQ_FILES = {"VQ-16": "vq_ds16_c2i.pt", "VQ-8": "vq_ds8_c2i.pt"}


def llamagen_state(path: str | Path, what: str, official: str | None) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen file, loaded with weights_only=True.

    DDP-trained models (GPT-B/L/XL) and the tokenizers keep it under "model" (LlamaGen's loaders also accept
    "module" and "state_dict"); FSDP-trained ones (GPT-XXL/3B) are the bare state dict. `official` names the
    released file, for the error when the path does not exist.
    """
    path = Path(path)
    if not path.is_file():
        where = (f"download {LLAMAGEN_URL}/resolve/main/{official} (MIT licence) and pass its local path"
                 if official else f"no official file exists for it ({LLAMAGEN_URL}); pass one you trained")
        raise FileNotFoundError(f"{what} {path} does not exist; nothing is downloaded here: {where}")
    with torch.serialization.safe_globals([argparse.Namespace]):  # LlamaGen's training scripts may save "args"
        ckpt = load_checkpoint(path, what)
    state = next((ckpt[k] for k in ("model", "module", "state_dict") if k in ckpt), ckpt)
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} holds a {type(state).__name__} where its state dict should be")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{what} {path} is not a LlamaGen state dict (bare or under 'model', 'module' or "
                         f"'state_dict'): non-tensor entries {bad[:5]}")
    return state


def load_llamagen_gpt(path: str | Path, size: str, image_size: int = 256):
    """An official LlamaGen c2i GPT file (c2i_B_256.pt ... c2i_3B_384.pt) as our GPT, in eval mode.

    size is the registry name (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B); image_size sets the token grid
    (image_size / 16)^2, i.e. 256 tokens for the *_256 files and 576 for the *_384 ones. A file with an official
    name must be loaded with the size and image size it was released for, since nothing in it says which grid it
    was trained on. A stray `freqs_cis` entry is dropped (the table is recomputed from the config).
    """
    from varkd.models.gpt import GPT, gpt_config

    if image_size <= 0 or image_size % 16:
        raise ValueError(f"image_size={image_size}: LlamaGen GPTs sit on a VQ-16 grid, so it must be a multiple of 16")
    config = gpt_config(size, block_size=(image_size // 16) ** 2)
    official = LLAMAGEN_GPT_FILES.get((size, image_size))
    released_as = {name: key for key, name in LLAMAGEN_GPT_FILES.items()}.get(Path(path).name)
    if released_as and released_as != (size, image_size):
        raise ValueError(f"{path} is the official {released_as[0]} file for {released_as[1]}px images, "
                         f"not {size} at {image_size}px")
    what = f"LlamaGen {size} {image_size}px checkpoint"
    state = llamagen_state(path, what, official)
    state.pop("freqs_cis", None)
    with torch.device("meta"):
        model = GPT(config)
    load_state_strict(model, state, f"{what} {path}", assign=True)
    return model.eval()


def load_llamagen_vq(path: str | Path, name: str = "VQ-16"):
    """An official LlamaGen tokenizer file (vq_ds16_c2i.pt, or vq_ds8_c2i.pt with name="VQ-8") as our VQModel,
    in eval mode. Strict like LlamaGen's own loader: the `quantize.codebook_used` buffer must be in the file."""
    from varkd.models.vq import VQModel, vq_config

    config = vq_config(name)
    what = f"LlamaGen {name} tokenizer"
    state = llamagen_state(path, what, LLAMAGEN_VQ_FILES[name])
    with torch.device("meta"):
        model = VQModel(config)
    load_state_strict(model, state, f"{what} {path}", assign=True)
    return model.eval()
