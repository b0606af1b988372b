"""VQ image tokenizer: the architecture of LlamaGen's VQ model (`tokenizer/tokenizer_image/vq_model.py`).

One class serves both scales: the default `VQConfig` is LlamaGen's VQ-16 (module names and state_dict keys are
LlamaGen's, so `vq_ds16_c2i.pt` loads strictly), and a small config gives the embedded study's tokenizer.

Differences from LlamaGen, none of which changes the weights or the forward values:
- channels, res blocks, GroupNorm groups and input channels are config fields (LlamaGen hard-codes them);
- the quantizer runs in float32 even under autocast, since an argmin over bf16 distances picks wrong codes;
- the quantizer returns its losses in eval mode too (LlamaGen returns None there), so validation can log them;
- the straight-through output equals the looked-up code exactly, so decoding indices reproduces `decode(quant)`.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varkd.images import to_model_input, to_uint8

CODEBOOK_USAGE_WINDOW = 65536  # LlamaGen's fixed length of the recent-indices buffer `codebook_used`


@dataclass
class VQConfig:
    """Tokenizer hyper-parameters; the defaults are LlamaGen's VQ-16."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout_p: float = 0.0
    in_channels: int = 3

    def __post_init__(self):
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks", "norm_groups",
                     "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("commit_loss_beta", "entropy_loss_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"VQConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"VQConfig.dropout_p must be in [0, 1), got {self.dropout_p}")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = list(getattr(self, name))
            if not mult or any(m < 1 for m in mult):
                raise ValueError(f"VQConfig.{name} must be a non-empty list of positive ints, got {mult}")
            # every GroupNorm sits on ch * mult channels (the first encoder block also on ch)
            bad = [self.ch * m for m in [1, *mult] if (self.ch * m) % self.norm_groups]
            if bad:
                raise ValueError(f"VQConfig.{name}: channel counts {bad} (ch={self.ch} x mult) are not divisible "
                                 f"by norm_groups={self.norm_groups}")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(f"VQConfig.decoder_ch_mult must have as many levels as encoder_ch_mult "
                             f"({len(self.encoder_ch_mult)}), or the decoder does not upsample back to the input "
                             f"size; got {len(self.decoder_ch_mult)}")

    @property
    def downsample(self) -> int:
        """Image side / token-grid side."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


# LlamaGen's tokenizer registry (`VQ_models`): overrides of VQConfig, whose other defaults (codebook 16384 x 8,
# l2-normalised, z_channels 256, ch 128, 2 res blocks) are those of the released vq_ds16_c2i.pt / vq_ds8_c2i.pt.
VQ_models: dict[str, dict[str, list[int]]] = {
    "VQ-16": dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),  # 71,883,403 parameters
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),  # 70,109,835 parameters
}


def vq_config(name: str, **overrides) -> VQConfig:
    """VQConfig for a registry name, e.g. vq_config("VQ-16") for LlamaGen's vq_ds16_c2i.pt."""
    if name not in VQ_models:
        raise KeyError(f"unknown VQ tokenizer {name!r}; choose from {sorted(VQ_models)}")
    return VQConfig(**{**VQ_models[name], **overrides})


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # swish


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # b, hw, c
        k = self.k(h).reshape(b, c, hh * ww)  # b, c, hw
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw(q), hw(k)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # torch convs have no asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Res blocks per level, a stride-2 conv between levels; attention only at the last (lowest-res) level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, list(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, ch * m, g, cfg.dropout_p))
                block_in = ch * m
                if i == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in, g))
            if i != len(mult) - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g, cfg.dropout_p), AttnBlock(block_in, g),
                                  ResnetBlock(block_in, block_in, g, cfg.dropout_p)])
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder with one extra res block per level; attention only at the first (lowest-res) level.

    `conv_blocks[0]` is the lowest-resolution level (channels ch * decoder_ch_mult[-1]).
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.ch, list(cfg.decoder_ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g, cfg.dropout_p), AttnBlock(block_in, g),
                                  ResnetBlock(block_in, block_in, g, cfg.dropout_p)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, ch * mult[i], g, cfg.dropout_p))
                block_in = ch * mult[i]
                if i == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in, g))
            if i != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


def compute_entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """LlamaGen's (MaskGIT's) entropy penalty: confident per-token choices, spread-out average usage."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through gradient (LlamaGen's `VectorQuantizer`)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.beta, self.entropy_loss_ratio = cfg.commit_loss_beta, cfg.entropy_loss_ratio
        self.l2_norm, self.show_usage = cfg.codebook_l2_norm, cfg.codebook_show_usage
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if self.show_usage:
            # Float buffer of the most recent indices, a key of LlamaGen's checkpoints (needed for strict loading).
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def codebook(self) -> torch.Tensor:
        """The code vectors the quantizer actually compares against: [V, D], l2-normalised when configured."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor):
        """z [B, D, h, w] -> (z_q [B, D, h, w], (vq_loss, commit_loss, entropy_loss, usage), (None, None, idx))."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).contiguous()  # b h w c
            if self.l2_norm:
                z = F.normalize(z, p=2, dim=-1)
            z_flat = z.view(-1, self.e_dim)
            embedding = self.codebook().float()
            d = (z_flat.pow(2).sum(1, keepdim=True) + embedding.pow(2).sum(1)
                 - 2 * z_flat @ embedding.t())
            indices = torch.argmin(d, dim=1)
            z_q = embedding[indices].view(z.shape)

            usage = 0.0
            if self.show_usage and self.training:
                n = min(indices.shape[0], CODEBOOK_USAGE_WINDOW)
                self.codebook_used[:-n] = self.codebook_used[n:].clone()
                self.codebook_used[-n:] = indices[-n:].to(self.codebook_used.dtype)
                usage = len(torch.unique(self.codebook_used)) / self.n_e

            vq_loss = torch.mean((z_q - z.detach()) ** 2)  # moves the codes towards the encoder outputs
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)  # keeps the encoder near its codes
            if self.entropy_loss_ratio > 0:
                entropy_loss = self.entropy_loss_ratio * compute_entropy_loss(-d)
            else:
                entropy_loss = torch.zeros((), device=z.device)

            # Straight-through: the value is z_q exactly (z - z.detach() is exactly zero), the gradient goes to z.
            z_q = z_q.detach() + (z - z.detach())
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # same layout as decode_code's input, so both decode alike
        return z_q, (vq_loss, commit_loss, entropy_loss, usage), (None, None, indices)

    def get_codebook_entry(self, indices, shape=None, channel_first=True):
        """Indices -> code vectors; `shape` is (B, D, h, w) if channel_first else (B, h, w, D)."""
        z_q = self.codebook()[indices]
        if shape is not None:
            if channel_first:
                z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
            else:
                z_q = z_q.view(shape)
        return z_q


class VQModel(nn.Module):
    """LlamaGen's VQ model: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else VQConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    # --- LlamaGen's interface -------------------------------------------------------------------------------
    def encode(self, x):
        """x float [B, C, H, W] in [-1, 1] -> (quant, (vq, commit, entropy, usage), (None, None, indices)).

        indices are flattened in (b, h, w) order, i.e. raster order within each image.
        """
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b, shape=None, channel_first=True):
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))

    def forward(self, input):
        quant, diff, _ = self.encode(input)
        return self.decode(quant), diff

    # --- conveniences for the rest of varkd -----------------------------------------------------------------
    def codebook_vectors(self) -> torch.Tensor:
        """[V, D] code vectors as the quantizer sees them (l2-normalised when configured), detached."""
        return self.quantize.codebook().detach()

    @torch.no_grad()
    def encode_to_codes(self, images, batch_size: int = 256) -> torch.Tensor:
        """uint8 NHWC images (array or tensor) -> LongTensor [N, h*w] of raster-order codes, on the CPU."""
        device, was_training = next(self.parameters()).device, self.training
        self.eval()
        try:
            out = []
            for i in range(0, len(images), batch_size):
                x = to_model_input(np.asarray(images[i:i + batch_size]) if not torch.is_tensor(images)
                                   else images[i:i + batch_size]).to(device)
                _, _, (_, _, idx) = self.encode(x)
                out.append(idx.view(x.shape[0], -1).cpu())
        finally:
            self.train(was_training)
        if not out:
            raise ValueError("encode_to_codes got no images")
        return torch.cat(out)

    @torch.no_grad()
    def decode_to_uint8(self, codes, batch_size: int = 256, size: int = 0) -> torch.Tensor:
        """Codes [N, h*w] (square grid, raster order) -> uint8 NHWC images on the CPU.

        size > 0: the decoded floats are resized bicubic to size x size before the uint8 conversion, as LlamaGen
        evaluates its 384px models at 256 (`F.interpolate(..., mode="bicubic")`, then the same clamp and cast).
        """
        codes = torch.as_tensor(codes, dtype=torch.long)
        side = math.isqrt(codes.shape[1])
        if codes.dim() != 2 or side * side != codes.shape[1]:
            raise ValueError(f"decode_to_uint8 expects codes [N, h*w] with a square grid, got {tuple(codes.shape)}")
        device, was_training = next(self.parameters()).device, self.training
        self.eval()
        try:
            out = []
            for i in range(0, codes.shape[0], batch_size):
                c = codes[i:i + batch_size].to(device)
                x = self.decode_code(c, shape=(c.shape[0], self.config.codebook_embed_dim, side, side))
                if size:
                    x = F.interpolate(x, size=(size, size), mode="bicubic")
                out.append(to_uint8(x).cpu())
        finally:
            self.train(was_training)
        if not out:
            raise ValueError("decode_to_uint8 got no codes")
        return torch.cat(out)
