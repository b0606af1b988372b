"""The training step and held-out metric for a VQ tokenizer (`varkd.models.vq.VQModel`); the loop lives elsewhere.

The loss is LlamaGen's `vq_train.py` generator loss without its perceptual and adversarial parts: L2
reconstruction (its default `reconstruction_loss='l2'`) + codebook loss + beta * commitment loss (+ entropy
loss when configured). LPIPS and the PatchGAN discriminator are left out on purpose: they exist to sharpen
natural 256-px images, and we assume a 32x32 MNIST miniature reconstructs well enough from L2 alone (the
embedded prototype reached MSE ~0.016 that way). Paper-scale work loads LlamaGen's released tokenizer instead
of training one.
"""
import numpy as np
import torch
import torch.nn.functional as F

from varkd.images import to_model_input
from varkd.models.vq import VQModel


def tokenizer_loss(model: VQModel, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss on float NCHW images in [-1, 1]; returns (loss to backprop, scalar logs).

    logs: loss, rec_mse, vq_loss, commit_loss (already times beta), entropy_loss, codebook_usage (fraction of
    the codebook seen in the quantizer's recent-indices window; 0 in eval mode or without show_usage).
    """
    recon, (vq_loss, commit_loss, entropy_loss, usage) = model(images)
    rec_mse = F.mse_loss(recon.float(), images.float())
    loss = rec_mse + vq_loss + commit_loss + entropy_loss
    logs = {
        "loss": loss.item(),
        "rec_mse": rec_mse.item(),
        "vq_loss": vq_loss.item(),
        "commit_loss": commit_loss.item(),
        "entropy_loss": float(entropy_loss),
        "codebook_usage": float(usage),
    }
    return loss, logs


@torch.no_grad()
def reconstruction_mse(model: VQModel, images_uint8, batch_size: int = 256) -> float:
    """Mean squared error (in [-1, 1] units) of encode -> quantize -> decode over uint8 NHWC images, eval mode."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for i in range(0, len(images_uint8), batch_size):
            batch = images_uint8[i:i + batch_size]
            x = to_model_input(batch if torch.is_tensor(batch) else np.asarray(batch)).to(device)
            recon, _ = model(x)
            total += F.mse_loss(recon.float(), x, reduction="sum").item()
            count += x.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("reconstruction_mse got no images")
    return total / count
