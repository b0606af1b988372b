"""The chunked KD loss: the plain loss and its gradient, for every divergence, weighting and token space, and the
same training run when the KD step uses it."""
import csv

import pytest
import torch

from varkd import distill
from varkd.config import ConfigError, MethodConfig, OptimConfig, TermConfig, WeightingConfig
from varkd.models.gpt import GPT, GPTConfig
from varkd.steps.train import train_gpt

from tests.helpers import DETERMINISTIC, job

B, T, V = 3, 16, 32
TERMS = {
    "ce": TermConfig(divergence="ce"),
    "fkl": TermConfig(divergence="fkl"),
    "rkl": TermConfig(divergence="rkl"),
    "jsd": TermConfig(divergence="jsd", beta=0.3),
    "skl": TermConfig(divergence="skl", alpha=0.1),
    "srkl": TermConfig(divergence="srkl", alpha=0.1),
    "tvd": TermConfig(divergence="tvd"),
    "clusters": TermConfig(divergence="fkl", cluster_weight=0.5),
    "acceptance_confidence": TermConfig(divergence="fkl", weighting=WeightingConfig(
        selector="acceptance", threshold=0.3, reweight="confidence")),
    "entropy_sequences": TermConfig(divergence="skl", weighting=WeightingConfig(
        selector="entropy", threshold=2.5, normalize="sequences", low_weight=0.2)),
    "topk_positions": TermConfig(divergence="rkl", weighting=WeightingConfig(selector="topk", top_k=3,
                                                                              normalize="positions")),
    "cluster_space": TermConfig(divergence="fkl", cluster_weight=0.25, weighting=WeightingConfig(
        selector="confidence", threshold=0.2, reweight="entropy", power=0.5, space="clusters")),
}


@pytest.mark.parametrize("chunk", [1, 9, 4096])  # one position per chunk, chunks that do not divide T, one chunk
@pytest.mark.parametrize("name", TERMS)
def test_chunked_loss_equals_the_plain_loss_and_its_gradient(name, chunk):
    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=V, num_classes=4, block_size=T, multiple_of=16,
                          dropout_p=0.0, token_dropout_p=0.0))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    x, y = torch.randint(V, (B, T)), torch.tensor([0, 2, 4])
    target = torch.randn(B, T, V) * 2
    clusters = (torch.randperm(V), 4)  # the codes in cluster order: 4 clusters of 8
    term = TERMS[name]

    plain = distill.term_loss(term, model(x[:, :-1], y), x, target, 1.5, clusters)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    chunked = distill.chunked_term_loss(term, model(x[:, :-1], y, head=False), model.output, x, target, 1.5,
                                        clusters, chunk=chunk)
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert torch.isfinite(plain) and plain.item() != 0
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for (key, _), a, b in zip(model.named_parameters(), chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)


def test_the_kd_step_with_chunks_trains_as_without(codes, tmp_path):
    """loss_chunk changes the memory of the step, not the run: the same losses, step by step."""
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=4, model=GPTConfig(**DETERMINISTIC)))
    kd = MethodConfig(terms=[TermConfig(divergence="fkl", weighting=WeightingConfig(reweight="confidence"))])
    logs = []
    for chunk in (0, 20):
        run = job(codes, tmp_path / f"chunk{chunk}", method="fkl", steps=6, kd=kd, teacher=str(teacher_path),
                  model=GPTConfig(**DETERMINISTIC))
        run.optim.loss_chunk = chunk
        train_gpt(run)
        logs.append([float(r["loss"]) for r in csv.DictReader(open(tmp_path / f"chunk{chunk}" / "train_log.csv"))])
    assert len(logs[0]) == 6
    assert logs[1] == pytest.approx(logs[0], rel=1e-4)


def test_negative_loss_chunk_is_named():
    with pytest.raises(ConfigError, match="loss_chunk"):
        OptimConfig(loss_chunk=-1)
