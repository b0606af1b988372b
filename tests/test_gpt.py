"""LlamaGen GPT: checkpoint layout, config checks, RoPE quirks, causality and the KV cache vs teacher forcing."""
import math

import pytest
import torch

from varkd.models.gpt import (
    GPT,
    GPT_models,
    GPTConfig,
    apply_rotary_emb,
    gpt_config,
    precompute_freqs_cis_2d,
)


TINY = dict(dim=64, n_layer=2, n_head=4, vocab_size=256, num_classes=10, block_size=16)


def tiny_model(seed=0, **overrides) -> GPT:
    """Random tiny model in eval mode; output.weight is re-initialised since LlamaGen zero-inits it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    torch.nn.init.normal_(model.output.weight, std=1.0)
    return model.eval()


def meta_model(name: str, **overrides) -> GPT:
    with torch.device("meta"):
        return GPT(gpt_config(name, **overrides))


# --- sizes and state_dict layout ---------------------------------------------------------------------------------
EXACT_PARAMS = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-3B": 3_096_659_200,
}


def test_gpt_b_param_count():
    assert meta_model("GPT-B", vocab_size=16384, num_classes=1000, block_size=256).num_params() == 110_888_448


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_registry_param_counts(name):
    assert set(GPT_models) == set(EXACT_PARAMS)
    assert meta_model(name).num_params() == EXACT_PARAMS[name]


def test_gpt_b_state_dict_matches_llamagen_keys():
    sd = meta_model("GPT-B").state_dict()
    expected = {
        "cls_embedding.embedding_table.weight": (1001, 768),
        "tok_embeddings.weight": (16384, 768),
        "norm.weight": (768,),
        "output.weight": (16384, 768),
    }
    for i in range(12):
        p = f"layers.{i}."
        expected.update(
            {
                p + "attention.wqkv.weight": (2304, 768),
                p + "attention.wo.weight": (768, 768),
                p + "feed_forward.w1.weight": (2048, 768),
                p + "feed_forward.w3.weight": (2048, 768),
                p + "feed_forward.w2.weight": (768, 2048),
                p + "attention_norm.weight": (768,),
                p + "ffn_norm.weight": (768,),
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(sd) == 88


def test_no_buffers_in_state_dict_even_with_caches():
    model = tiny_model()
    keys = set(model.state_dict())
    model.setup_caches(4)
    assert set(model.state_dict()) == keys
    model.clear_caches()
    assert not model.has_caches and set(model.state_dict()) == keys


def test_init_and_no_biases():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    assert torch.count_nonzero(model.output.weight) == 0  # LlamaGen zero-inits the head
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    w = torch.cat([l.attention.wqkv.weight.flatten() for l in model.layers])
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_ffn_hidden_rule():
    assert GPTConfig(dim=768).ffn_hidden == 2048
    assert GPTConfig(dim=3200, n_head=32).ffn_hidden == 8704
    assert GPTConfig(dim=64, n_head=4, multiple_of=32).ffn_hidden == 192  # int(512/3) = 170 -> 192
    assert GPTConfig(dim=768, ffn_dim_multiplier=1.3).ffn_hidden == 2816  # int(1.3 * 2048) = 2662 -> 2816


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=100, n_head=12), "dim"),
        (dict(dim=72, n_head=12), "n_head"),  # head_dim 6 is not a multiple of 4
        (dict(block_size=250), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(cls_token_num=2), "cls_token_num"),
        (dict(ffn_dim_multiplier=0.0), "ffn_dim_multiplier"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}="):
        GPTConfig(**kwargs)


# --- 2-D RoPE ----------------------------------------------------------------------------------------------------
def test_rope_table_layout_and_zero_class_row():
    g, hd, base = 4, 8, 100.0
    t = precompute_freqs_cis_2d(g, hd, base, cls_token_num=1)
    assert t.shape == (1 + g * g, hd // 2, 2) and t.dtype == torch.float32
    assert torch.count_nonzero(t[0]) == 0  # cos = sin = 0 for the class token
    f = [1.0, base ** -0.5]  # head_dim/4 = 2 frequencies: 1/base^(0/4), 1/base^(2/4)
    for r in range(g):
        for c in range(g):
            angles = [r * f[0], r * f[1], c * f[0], c * f[1]]  # row block, then column block
            want = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
            torch.testing.assert_close(t[1 + r * g + c], want)


def test_apply_rotary_emb_hand_computed():
    g, hd, base = 3, 8, 100.0
    table = precompute_freqs_cis_2d(g, hd, base)
    x = torch.arange(1.0, 9.0).view(1, 1, 1, hd)
    r, c = 1, 2  # cell (1, 2) sits at sequence position 1 + 1*3 + 2 = 6
    out = apply_rotary_emb(x, table[6:7]).flatten()
    angles = [r, r / math.sqrt(base), c, c / math.sqrt(base)]
    want = []
    for k, a in enumerate(angles):  # interleaved pairs (x[2k], x[2k+1])
        x0, x1 = x.flatten()[2 * k].item(), x.flatten()[2 * k + 1].item()
        want += [x0 * math.cos(a) - x1 * math.sin(a), x1 * math.cos(a) + x0 * math.sin(a)]
    torch.testing.assert_close(out, torch.tensor(want))
    # position 0 (class token): q and k are zeroed
    assert torch.count_nonzero(apply_rotary_emb(torch.randn(2, 1, 3, hd), table[:1])) == 0


def test_rope_in_fp32_for_bf16_inputs():
    table = precompute_freqs_cis_2d(4, 16)
    x = torch.randn(2, 17, 2, 16).bfloat16()
    out = apply_rotary_emb(x, table)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rotary_emb(x.float(), table).bfloat16(), rtol=0, atol=0)


def test_model_rope_stays_fp32_after_cast():
    model = tiny_model().bfloat16()
    assert model.freqs_cis.dtype == torch.float32
    assert model(torch.randint(0, 256, (2, 15)), torch.tensor([1, 2])).dtype == torch.float32


# --- forward semantics -------------------------------------------------------------------------------------------
def test_teacher_forced_shapes():
    model = tiny_model()
    B, T = 3, 16
    y = torch.tensor([0, 5, 10])  # 10 = null class
    assert model(torch.randint(0, 256, (B, T - 1)), y).shape == (B, T, 256)
    cls_only = model(None, y)
    assert cls_only.shape == (B, 1, 256) and cls_only.dtype == torch.float32
    torch.testing.assert_close(model(torch.zeros(B, 0, dtype=torch.long), y), cls_only)
    with pytest.raises(ValueError):
        model(torch.randint(0, 256, (B, T + 1)), y)  # longer than the RoPE table


def test_model_never_drops_labels_in_train_mode():
    model = tiny_model(dropout_p=0.0, token_dropout_p=0.0)
    idx, y = torch.randint(0, 256, (8, 15)), torch.arange(8)
    ref = model(idx, y)
    model.train()
    torch.testing.assert_close(model(idx, y), ref)  # no hidden label -> null replacement


def test_causality():
    model = tiny_model()
    idx, y = torch.randint(0, 256, (2, 15)), torch.tensor([3, 7])
    ref = model(idx, y)
    for k in (0, 6, 14):
        idx2 = idx.clone()
        idx2[:, k] = (idx2[:, k] + 1) % 256
        out = model(idx2, y)
        # token k sits at position k+1: positions <= k must not see it, position k+1 must
        torch.testing.assert_close(out[:, : k + 1], ref[:, : k + 1], rtol=0, atol=1e-5)
        if k + 1 < out.shape[1]:
            assert (out[:, k + 1] - ref[:, k + 1]).abs().max() > 1e-3


def test_class_token_changes_everything():
    model = tiny_model()
    idx = torch.randint(0, 256, (1, 15))
    a, b = model(idx, torch.tensor([1])), model(idx, torch.tensor([2]))
    assert ((a - b).abs().amax(-1) > 1e-3).all()


# --- KV cache ----------------------------------------------------------------------------------------------------
def test_cached_steps_match_teacher_forcing():
    model = tiny_model()
    B, T = 3, 16
    idx, y = torch.randint(0, 256, (B, T - 1)), torch.tensor([0, 4, 10])
    ref = model(idx, y)  # [B, T, V]
    model.setup_caches(max_batch_size=2 * B)  # a larger cache than the batch must work too
    steps = [model(None, y, input_pos=torch.tensor([0]))]
    for p in range(1, T):
        steps.append(model(idx[:, p - 1 : p], None, input_pos=torch.tensor([p])))
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-5, atol=1e-5)
    model.clear_caches()


def test_cached_prefill_with_prefix_then_steps():
    model = tiny_model()
    B, T, n = 2, 16, 6
    idx, y = torch.randint(0, 256, (B, T - 1)), torch.tensor([1, 2])
    ref = model(idx, y)
    model.setup_caches(B)
    pre = model(idx[:, :n], y, input_pos=torch.arange(n + 1))
    steps = [model(idx[:, p - 1 : p], None, input_pos=torch.tensor([p])) for p in range(n + 1, T)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), ref, rtol=1e-5, atol=1e-5)


def test_cache_errors():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(None, torch.tensor([1]), input_pos=torch.tensor([0]))
    model.setup_caches(1)
    with pytest.raises(RuntimeError, match="batch"):
        model(None, torch.tensor([1, 2]), input_pos=torch.tensor([0]))
