"""Image tensor conventions shared by the tokenizer, sampler and metrics.

Images at rest are uint8 NHWC RGB (what `samples.npz` and the ADM evaluator use); models see float NCHW in
[-1, 1]. The uint8 conversion is LlamaGen's `clamp(127.5 * x + 128, 0, 255)`, so paper-scale samples match it.
"""
import numpy as np
import torch


def to_model_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float NCHW in about [-1, 1] -> uint8 NHWC."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
