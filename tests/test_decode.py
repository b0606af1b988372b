"""The decode engine: the reference sampler's exact tokens, a step that traces whole, state that never leaks
between batches, decoding copies that follow the optimizer."""
import pytest
import torch

from varkd.decode import Decoder, decode_step, generate
from varkd.sampling import Sampling
from varkd.sjd import generate_sjd

from tests.helpers import tiny_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


SETTINGS = {
    "greedy": Sampling(temperature=0.0),
    "greedy_cfg": Sampling(cfg_scale=3.0, temperature=0.0),
    "sampled": Sampling(),
    "cfg_temperature": Sampling(cfg_scale=1.5, temperature=1.3),
    "top_k": Sampling(top_k=5),
    "top_p_cfg": Sampling(cfg_scale=2.0, top_p=0.8),
    "all": Sampling(cfg_scale=1.5, temperature=0.7, top_k=20, top_p=0.9),
}


@pytest.mark.parametrize("bucket", [1, 4, 64])
@pytest.mark.parametrize("case", SETTINGS)
def test_engine_gives_the_reference_samplers_tokens(case, bucket):
    """The engine (static cache, bucketed attention, uniforms drawn per batch) against full recomputation of the
    prefix at every step with the same uniforms: the same tokens, greedy and seeded."""
    model = tiny_model()
    y = torch.tensor([0, 3, 9, 10, 4, 4])  # 10 = the null class
    ref = generate(model, y, SETTINGS[case], generator=gen(1), use_cache=False)
    out = generate(Decoder(model, bucket=bucket), y, SETTINGS[case], generator=gen(1))
    assert len(set(ref.flatten().tolist())) > 4  # not a degenerate constant sequence
    assert torch.equal(out, ref)


def test_the_step_traces_whole():
    """decode_step compiles with fullgraph=True (no graph break: no host sync, no data-dependent shape), for every
    cache-length bucket of a generation, and gives the eager step's tokens."""
    torch._dynamo.reset()
    model = tiny_model()
    y = torch.tensor([1, 2, 3])
    decoder = Decoder(model, bucket=4)
    decoder.step = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    for sampling in (Sampling(temperature=0.0), Sampling(cfg_scale=2.0, top_k=10, top_p=0.9)):
        assert torch.equal(generate(decoder, y, sampling, generator=gen(2)),
                           generate(model, y, sampling, generator=gen(2)))


@pytest.mark.parametrize("sampler", ["ar", "sjd"])
def test_a_batch_after_another_equals_a_fresh_batch_even_on_a_poisoned_cache(sampler):
    model = tiny_model()
    sampling = Sampling(cfg_scale=1.5, top_k=30)

    def run(decoder, y):
        if sampler == "ar":
            return generate(decoder, y, sampling, generator=gen(5))
        return generate_sjd(decoder, y, sampling, generator=gen(5), window=4)[0]

    reused = Decoder(model)
    run(reused, torch.arange(8))  # batch A: more rows than B
    for layer in reused.net.layers:
        layer.attention.kv_cache.k_cache.fill_(float("nan"))
        layer.attention.kv_cache.v_cache.fill_(float("nan"))
    b = torch.tensor([7, 1, 1])
    assert torch.equal(run(reused, b), run(Decoder(model), b))
    assert reused.rows == 16 and not model.has_caches  # allocated once for A's rows (with CFG), in the copy only


def test_bf16_copies_follow_the_optimizer():
    model = tiny_model()
    decoder = Decoder(model, dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.net.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in decoder.net.parameters())
    assert model.tok_embeddings.weight.dtype == torch.float32  # the model itself is not cast
    y = torch.arange(4)
    generate(decoder, y, generator=gen(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randint(64, (4, 15)), y).logsumexp(-1).mean().backward()
    optimizer.step()
    generate(decoder, y, generator=gen(0))
    for (name, mine), theirs in zip(decoder.net.named_parameters(), model.parameters()):
        assert torch.equal(mine, theirs.detach().to(torch.bfloat16)), name


def test_decoding_dtype_follows_the_callers_autocast_and_shares_same_dtype_weights():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Decoder(model).dtype == torch.bfloat16
    same = Decoder(model)
    assert same.dtype == torch.float32 and same.net.output.weight is model.output.weight
    assert not same.net.training and model.training  # its own modules: the model's mode is untouched


def test_bf16_engine_matches_a_bf16_model_greedily():
    """The bf16 engine decodes what the model cast to bf16 decodes by full recomputation (greedy agreement on
    nearly every token: only the KV cache's summation order differs)."""
    model = tiny_model()
    y = torch.arange(10)
    out = generate(Decoder(model, dtype=torch.bfloat16), y, Sampling(temperature=0.0))
    ref = generate(tiny_model().to(torch.bfloat16), y, Sampling(temperature=0.0), use_cache=False)
    assert (out == ref).float().mean() > 0.9


def test_bad_bucket_is_named():
    with pytest.raises(ValueError, match="bucket"):
        Decoder(tiny_model(), bucket=0)
