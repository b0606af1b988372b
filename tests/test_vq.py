"""The VQ tokenizer: LlamaGen VQ-16 key layout, shapes, quantizer maths, trainability, uint8 helpers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varkd.models.vq import VQConfig, VQModel
from varkd.tokenizer import reconstruction_mse, tokenizer_loss

from tests.helpers import tiny_config, vq16_shapes

VQ16_PARAMS = 71_883_403


def test_vq16_state_dict_matches_llamagen():
    ref = {k: list(v) for k, v in vq16_shapes().items()}  # the vendored key list
    assert len(ref) == 344
    with torch.device("meta"):
        model = VQModel(VQConfig())
    sd = model.state_dict()
    assert set(sd) == set(ref), (sorted(set(sd) - set(ref))[:5], sorted(set(ref) - set(sd))[:5])
    wrong = {k: (list(v.shape), ref[k]) for k, v in sd.items() if list(v.shape) != ref[k]}
    assert not wrong
    assert sum(p.numel() for p in model.parameters()) == VQ16_PARAMS
    assert "quantize.codebook_used" not in dict(model.named_parameters())


def test_config_defaults_and_validation():
    cfg = VQConfig()
    assert cfg.downsample == 16 and tiny_config().downsample == 4
    assert "quantize.codebook_used" not in VQModel(tiny_config(codebook_show_usage=False)).state_dict()
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=24, norm_groups=32)
    with pytest.raises(ValueError, match="decoder_ch_mult"):
        VQConfig(decoder_ch_mult=[1, 2])
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=0)


def test_shapes_and_index_round_trip():
    torch.manual_seed(0)
    model = VQModel(tiny_config()).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    quant, losses, (_, _, idx) = model.encode(x)
    assert quant.shape == (3, 8, 8, 8)
    assert idx.shape == (3 * 64,) and idx.dtype == torch.long
    dec, _ = model(x)
    assert dec.shape == x.shape
    # (b, h, w) flattening: the code at batch 1, row 2, col 5 is the nearest to that position's vector
    assert torch.equal(quant[1, :, 2, 5], model.codebook_vectors()[idx[1 * 64 + 2 * 8 + 5]])
    with torch.no_grad():
        from_codes = model.decode_code(idx, shape=(3, 8, 8, 8))
        assert torch.equal(from_codes, model.decode(quant))
        nhwc = model.quantize.get_codebook_entry(idx, shape=(3, 8, 8, 8), channel_first=False)
        assert torch.equal(nhwc.permute(0, 3, 1, 2), quant)


def test_downsample_pads_right_and_bottom():
    """LlamaGen pads (0, 1, 0, 1): output (0, 0) sees input rows/cols 0..2, which loaded weights rely on."""
    from varkd.models.vq import Downsample

    down = Downsample(1)
    torch.nn.init.ones_(down.conv.weight)
    torch.nn.init.zeros_(down.conv.bias)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 2, 2] = 1.0
    assert down(x)[0, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_quantizer_picks_nearest_normalised_code():
    torch.manual_seed(1)
    model = VQModel(tiny_config())
    model.quantize.embedding.weight.data.normal_()  # unnormalised rows: the quantizer must normalise them
    z = torch.randn(2, 8, 4, 4) * 3
    z_q, (vq_loss, commit_loss, _, _), (_, _, idx) = model.quantize(z)
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    code = F.normalize(model.quantize.embedding.weight, dim=-1)
    brute = torch.cdist(zn, code).argmin(dim=1)
    assert torch.equal(idx, brute)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 8), code[brute])
    expected = ((code[brute] - zn) ** 2).mean()
    assert torch.allclose(vq_loss, expected) and torch.allclose(commit_loss, 0.25 * expected)
    assert torch.allclose(model.codebook_vectors().norm(dim=-1), torch.ones(64))


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(2)
    model = VQModel(tiny_config())
    dec, _ = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    dec.square().mean().backward()  # reconstruction only: gradient must cross the quantizer
    for name in ("encoder.conv_in.weight", "quant_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_codebook_usage_window_updates_in_training_only():
    torch.manual_seed(3)
    model = VQModel(tiny_config())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.eval()
    model(x)
    assert model.quantize.codebook_used.abs().sum() == 0
    model.train()
    _, (_, _, _, usage) = model(x)
    _, _, (_, _, idx) = model.encode(x)
    assert torch.equal(model.quantize.codebook_used[-128:].long(), idx)
    assert 0 < usage <= 1


def synthetic_images(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 NHWC: one bright axis-aligned rectangle of random colour on black per image."""
    img = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2 + size // 8, size=2)
        h, w = rng.integers(size // 4, size // 2, size=2)
        img[i, y0:y0 + h, x0:x0 + w] = rng.integers(128, 256, size=3)
    return img


@pytest.mark.slow
def test_tokenizer_loss_trains():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # 16x16 images and one downsample (8x8 tokens) keep this to a few seconds on two cores
    train, held_out = synthetic_images(256, rng, 16), synthetic_images(64, rng, 16)
    model = VQModel(tiny_config(codebook_size=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train = torch.from_numpy(train).permute(0, 3, 1, 2).float() / 127.5 - 1
    for _ in range(100):
        loss, logs = tokenizer_loss(model, x_train[torch.randint(0, 256, (16,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) >= {"rec_mse", "vq_loss", "commit_loss", "codebook_usage"}
    assert all(np.isfinite(v) for v in logs.values())
    after = reconstruction_mse(model, held_out, batch_size=64)
    assert model.training  # reconstruction_mse restores the mode
    # an all-black output already gets the background right; the model must also draw the rectangles
    all_black = ((held_out.astype(np.float64) / 127.5) ** 2).mean()
    assert after < 0.3 * all_black, (after, all_black)


def test_uint8_helpers():
    torch.manual_seed(4)
    model = VQModel(tiny_config())
    images = synthetic_images(5, np.random.default_rng(1))
    codes = model.encode_to_codes(images, batch_size=2)
    assert codes.dtype == torch.long and codes.shape == (5, 64)
    assert codes.min() >= 0 and codes.max() < 64
    assert torch.equal(codes, model.encode_to_codes(torch.from_numpy(images), batch_size=5))
    out = model.decode_to_uint8(codes, batch_size=3)
    assert out.dtype == torch.uint8 and out.shape == (5, 32, 32, 3)
    assert model.training
    with pytest.raises(ValueError, match="square"):
        model.decode_to_uint8(codes[:, :63])


def test_tokenizer_job_is_reproducible_and_refuses_a_collapsed_codebook(tmp_path):
    """The job seeds its initial weights (two runs write the same bytes) and fails, naming the codebook usage and
    writing no tokenizer, when fewer than tokenizer.min_codebook_usage of the codes are in use."""
    from varkd.config import OptimConfig, TokenizerConfig, TokenizerJob
    from varkd.data import Split, save_splits
    from varkd.steps.data import train_tokenizer

    rng = np.random.default_rng(0)
    save_splits(tmp_path / "images.npz", {name: Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                                      np.zeros(n, np.int64)) for name, n in (("train", 16), ("val", 4))})
    optim = OptimConfig(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=3, log_every=1, precision="fp32")

    def job(out, usage):
        return TokenizerJob(tokenizer=TokenizerConfig(model=tiny_config(), optim=optim, min_codebook_usage=usage),
                            images=str(tmp_path / "images.npz"), out_dir=str(tmp_path / out))

    train_tokenizer(job("a", 0.0), torch.device("cpu"))
    train_tokenizer(job("b", 0.0), torch.device("cpu"))
    assert (tmp_path / "a" / "tokenizer.pt").read_bytes() == (tmp_path / "b" / "tokenizer.pt").read_bytes()
    used = torch.load(tmp_path / "a" / "tokenizer.pt", weights_only=True)["train"]["codes_used"]
    assert 0 < used <= 16 * 64
    with pytest.raises(ValueError, match=rf"collapsed: {used} of 64 codes .* below tokenizer.min_codebook_usage=1.0"):
        train_tokenizer(job("c", 1.0), torch.device("cpu"))
    assert not (tmp_path / "c" / "tokenizer.pt").exists()
