"""Speculative Jacobi decoding: greedy equals AR greedy, exact sequence distribution (chi-square), stats, cleanup."""
import dataclasses
import itertools

import pytest
import torch

from varkd.decode import generate
from varkd.models.gpt import GPT, GPTConfig
from varkd.sampling import Sampling, cfg_logits, filter_logits
import varkd.sjd
from varkd.sjd import generate_sjd


def tiny_model(seed=0, output_std=1.0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = {**dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16), **overrides}
    model = GPT(GPTConfig(**cfg))
    torch.nn.init.normal_(model.output.weight, std=output_std)  # LlamaGen zero-inits it: all logits would tie
    return model


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- greedy ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_ar(cfg_scale):
    model = tiny_model()
    y = torch.tensor([0, 3, 9, 10, 10, 4])  # 10 = the null class
    ref = generate(model, y, Sampling(cfg_scale=cfg_scale, temperature=0.0))
    assert len(set(ref.flatten().tolist())) > 4  # not a degenerate constant sequence
    for window, init in itertools.product([1, 3, 16], ["random", "repeat_horizon"]):
        out, _ = generate_sjd(model, y, Sampling(cfg_scale=cfg_scale, temperature=0.0), window=window, init=init,
                              generator=gen(window))
        assert torch.equal(out, ref), (window, init)


# --- exact distribution ------------------------------------------------------------------------------------------
SEQS = torch.tensor(list(itertools.product(range(3), repeat=4)))  # all 81 sequences: vocab 3, 2x2 grid
N = 20_000
# 0.999 quantiles of chi-square(df) (scipy.stats.chi2.ppf(0.999, df)) for the pooled cell counts used below
CHI2_CRIT = {15: 37.697, 18: 42.312, 69: 111.055}
CASES = {  # sampling settings, SJD window and init
    "cfg2": (Sampling(cfg_scale=2.0), 4, "random"),
    "topk": (Sampling(temperature=1.3, top_k=2), 2, "repeat_horizon"),
    "topp_cfg": (Sampling(cfg_scale=1.5, top_p=0.8), 3, "random"),
}


def vocab3_model() -> GPT:
    return tiny_model(dim=16, n_head=2, vocab_size=3, num_classes=2, block_size=4, multiple_of=16,
                      initializer_range=0.1, output_std=0.5).eval()


def exact_probs(model, label, sampling: Sampling) -> torch.Tensor:
    """Probability of each of SEQS under AR sampling, from teacher-forced forwards (float64 products)."""
    y = torch.full((len(SEQS),), label)
    logits = model(SEQS[:, :-1], y)
    if sampling.guided:
        logits = cfg_logits(logits, model(SEQS[:, :-1], torch.full_like(y, model.config.num_classes)),
                            sampling.cfg_scale)
    logp = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).log_softmax(-1).double()
    return logp.gather(-1, SEQS[..., None]).squeeze(-1).sum(-1).exp()


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; the cells with the smallest expected counts are pooled until the
    pool's expected count is >= 5. A sample of a zero-probability sequence is an error."""
    counts = torch.bincount((samples * torch.tensor([27, 9, 3, 1])).sum(-1), minlength=81).double()
    possible = probs > 0
    assert counts[~possible].sum() == 0, "a zero-probability sequence was sampled"
    expected, order = torch.sort(len(samples) * probs[possible])
    observed = counts[possible][order]
    pool = int((expected.cumsum(0) < 5).sum()) + 1
    expected = torch.cat([expected[:pool].sum(0, keepdim=True), expected[pool:]])
    observed = torch.cat([observed[:pool].sum(0, keepdim=True), observed[pool:]])
    return ((observed - expected) ** 2 / expected).sum().item(), len(expected) - 1


def passes_chi_square(samples, probs) -> bool:
    stat, df = chi_square(samples, probs)
    assert df in CHI2_CRIT, f"no critical value for df={df}"
    return stat < CHI2_CRIT[df]


@pytest.mark.parametrize("case", CASES)
def test_sjd_and_ar_sample_the_exact_sequence_distribution(case):
    sampling, window, init = CASES[case]
    model = vocab3_model()
    probs = exact_probs(model, 1, sampling)
    torch.testing.assert_close(probs.sum().item(), 1.0)
    y = torch.ones(N, dtype=torch.long)
    sjd, stats = generate_sjd(model, y, sampling, window=window, init=init, generator=gen(1))
    assert stats["forward_passes_per_image"] < 4  # drafts were accepted: the test exercises verification
    assert passes_chi_square(sjd, probs)
    assert passes_chi_square(generate(model, y, sampling, generator=gen(2)), probs)


class AcceptEveryDraft:
    """Stands in for varkd.sjd's `torch` with all uniforms 0, so every draft with p > 0 is kept."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def rand(*shape, generator=None, device=None, dtype=None):
        return torch.zeros(shape, device=device, dtype=dtype)


def test_chi_square_rejects_wrong_samplers(monkeypatch):
    """The distribution test has power: a broken acceptance and a 10% too weak guidance both fail it."""
    sampling, window, init = CASES["cfg2"]
    model = vocab3_model()
    probs = exact_probs(model, 1, sampling)
    y = torch.ones(N, dtype=torch.long)
    weak = dataclasses.replace(sampling, cfg_scale=1.9)
    weak_cfg, _ = generate_sjd(model, y, weak, window=window, init=init, generator=gen(1))
    assert not passes_chi_square(weak_cfg, probs)
    monkeypatch.setattr(varkd.sjd, "torch", AcceptEveryDraft())
    accept_all, _ = generate_sjd(model, y, sampling, window=window, init=init, generator=gen(1))
    assert not passes_chi_square(accept_all, probs)


# --- stats and bookkeeping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("init", ["random", "repeat_horizon"])
def test_stats(window, init):
    model = tiny_model(output_std=0.3)
    out, stats = generate_sjd(model, torch.arange(8), Sampling(cfg_scale=1.5, top_k=20), window=window, init=init,
                              generator=gen(0))
    T = 16
    assert out.shape == (8, T) and out.dtype == torch.long and 0 <= out.min() and out.max() < 64
    assert stats["tokens"] == 8 * T
    assert stats["iterations"] <= T
    assert T / window <= stats["forward_passes_per_image"] <= stats["iterations"]
    if window == 1:
        assert stats["iterations"] == stats["forward_passes_per_image"] == T


def test_sjd_is_reproducible_with_generator():
    model = tiny_model()
    y = torch.tensor([1, 1, 4, 10])
    a, _ = generate_sjd(model, y, Sampling(cfg_scale=2.0, top_p=0.9), window=5, generator=gen(3))
    b, _ = generate_sjd(model, y, Sampling(cfg_scale=2.0, top_p=0.9), window=5, generator=gen(3))
    c, _ = generate_sjd(model, y, Sampling(cfg_scale=2.0, top_p=0.9), window=5, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sjd_restores_mode_and_clears_caches():
    model = tiny_model().train()
    keys = set(model.state_dict())
    a, _ = generate_sjd(model, torch.arange(5), Sampling(temperature=0.0), window=4)
    assert model.training and not model.has_caches and set(model.state_dict()) == keys
    b, _ = generate_sjd(model, torch.arange(2), Sampling(cfg_scale=1.5, temperature=0.0))  # another row count after
    assert b.shape == (2, 16) and not model.has_caches
    assert torch.equal(a[:2], generate_sjd(model.eval(), torch.arange(2), Sampling(temperature=0.0))[0])
    assert not model.training


def test_sjd_rejects_bad_arguments():
    model = tiny_model(num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="init"):
        generate_sjd(model, torch.arange(2), init="zeros")
    with pytest.raises(ValueError, match="window"):
        generate_sjd(model, torch.arange(2), window=0)
    with pytest.raises(ValueError, match="null-class"):
        generate_sjd(model, torch.arange(2), Sampling(cfg_scale=2.0))
    assert not model.has_caches
