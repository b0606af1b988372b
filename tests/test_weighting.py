"""Token weighting (selective, reweighted supervision) on hand-made distributions with known weights."""
import math

import pytest
import torch

from varkd import selection
from varkd.config import TermConfig, WeightingConfig
from varkd.distill import term_loss
from varkd.losses import forward_kl
from varkd.weighting import teacher_entropy, token_weights, weighted_mean

# one sequence of three positions over a vocabulary of 4
P_T = torch.tensor([[[0.85, 0.05, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]]])
Q_S = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]]])
TOKENS = torch.tensor([[0, 0, 2]])  # the sequence's own tokens


def weights(**kw) -> torch.Tensor:
    return token_weights(WeightingConfig(**kw), Q_S.log(), P_T.log(), TOKENS)[0]


def test_confidence_selector_gates_on_the_teacher_max_probability():
    torch.testing.assert_close(weights(selector="confidence", threshold=0.5), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(weights(selector="confidence", threshold=0.39, low_weight=0.2),
                               torch.tensor([1.0, 0.2, 1.0]))


def test_entropy_selector_gates_on_the_teacher_entropy():
    h = [-sum(p * math.log(p) for p in row) for row in P_T[0].tolist()]  # 0.59, log 4 = 1.39, 1.19
    assert teacher_entropy(P_T.log())[0].tolist() == pytest.approx(h, rel=1e-5)
    torch.testing.assert_close(weights(selector="entropy", threshold=1.2), torch.tensor([1.0, 0.0, 1.0]))


def test_acceptance_selector_is_speculative_verification_of_the_own_token():
    # min(1, p_T(x) / q_S(x)): 0.85/0.25 -> 1; 0.25/0.7 = 0.357; 0.1/0.4 = 0.25
    torch.testing.assert_close(weights(selector="acceptance", threshold=0.3), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(weights(selector="acceptance", threshold=0.36), torch.tensor([1.0, 0.0, 0.0]))


def test_topk_selector_checks_membership_of_the_own_token():
    torch.testing.assert_close(weights(selector="topk", top_k=1), torch.tensor([1.0, 1.0, 0.0]))  # ties count
    torch.testing.assert_close(weights(selector="topk", top_k=3), torch.tensor([1.0, 1.0, 1.0]))


def test_continuous_reweighting_multiplies_the_gate():
    torch.testing.assert_close(weights(reweight="confidence"), torch.tensor([0.85, 0.25, 0.4]))
    h = teacher_entropy(P_T.log())[0]
    torch.testing.assert_close(weights(reweight="entropy"), 1 - h / math.log(4))
    torch.testing.assert_close(weights(selector="confidence", threshold=0.5, reweight="confidence"),
                               torch.tensor([0.85, 0.0, 0.0]))


def test_normalisation_by_weights_or_positions():
    d, w = torch.tensor([1.0, 2.0, math.inf, 4.0]), torch.tensor([0.5, 1.0, 0.0, 0.5])
    assert weighted_mean(d, w, "weights").item() == pytest.approx((0.5 + 2 + 2) / 2.0)
    assert weighted_mean(d, w, "positions").item() == pytest.approx((0.5 + 2 + 2) / 4)
    assert weighted_mean(d, torch.zeros(4), "weights").item() == 0.0  # nothing selected: no supervision


def test_weighted_term_has_no_gradient_through_the_weights_and_no_nan():
    student = Q_S.log().clone().requires_grad_(True)
    teacher = P_T.log().clone()
    teacher[0, 2, 3] = -math.inf  # a filtered teacher entry
    term = TermConfig(divergence="fkl", weighting=WeightingConfig(selector="acceptance", threshold=0.3,
                                                                   reweight="confidence"))
    loss = term_loss(term, student, TOKENS, teacher, temperature=1.0)
    w = token_weights(term.weighting, student, teacher, TOKENS)
    assert w.grad_fn is None
    expected = (w * forward_kl(student, teacher)).sum() / w.sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 2].abs().sum() == 0  # the masked position gets no gradient


def test_tempered_reweighting_raises_the_score_to_its_power():
    torch.testing.assert_close(weights(reweight="confidence", power=0.5), torch.tensor([0.85, 0.25, 0.4]).sqrt())
    torch.testing.assert_close(weights(reweight="confidence", power=0.0), torch.ones(3))  # flat: no reweighting
    h = teacher_entropy(P_T.log())[0]
    torch.testing.assert_close(weights(reweight="entropy", power=2.0), (1 - h / math.log(4)) ** 2)


def test_selection_in_cluster_space_reads_the_marginals_and_the_tokens_cluster():
    # clusters {0, 2} and {1, 3}: order lists the codes cluster by cluster
    order = torch.tensor([0, 2, 1, 3])
    cluster_of = {0: 0, 2: 0, 1: 1, 3: 1}
    w = token_weights(WeightingConfig(selector="acceptance", threshold=0.9, reweight="confidence", space="clusters"),
                      Q_S.log(), P_T.log(), TOKENS, clusters=(order, 2))[0]
    expected = []
    for t, x in enumerate(TOKENS[0].tolist()):  # brute force over the cluster marginals, float64
        p = [sum(P_T[0, t, v].double() for v in cluster_of if cluster_of[v] == c) for c in range(2)]
        q = [sum(Q_S[0, t, v].double() for v in cluster_of if cluster_of[v] == c) for c in range(2)]
        accepted = min(1.0, p[cluster_of[x]] / q[cluster_of[x]]) >= 0.9
        expected.append(float(accepted) * max(p))
    torch.testing.assert_close(w.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clusters"):
        token_weights(WeightingConfig(selector="confidence", space="clusters"), Q_S.log(), P_T.log(), TOKENS)


def test_per_sequence_normalisation_gives_every_weighted_sequence_the_same_say():
    d = torch.tensor([[1.0, 3.0], [10.0, math.inf], [5.0, 7.0]])
    w = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.0, 0.0]])  # the last sequence has no weight: left out
    assert weighted_mean(d, w, "sequences").item() == pytest.approx((2.0 + 10.0) / 2)
    assert weighted_mean(d, w, "weights").item() == pytest.approx((1 + 3 + 5) / 2.5)
    assert weighted_mean(d, torch.zeros(3, 2), "sequences").item() == 0.0


def test_weighting_settings_are_checked_before_any_compute():
    from varkd.config import ConfigError, MethodConfig
    with pytest.raises(ConfigError, match="power"):
        WeightingConfig(reweight="confidence", power=-1.0)
    with pytest.raises(ConfigError, match="normalize"):
        WeightingConfig(normalize="rows")
    cluster_space = TermConfig(weighting=WeightingConfig(selector="confidence", space="clusters"))
    with pytest.raises(ConfigError, match="clusters must be > 0"):
        MethodConfig(terms=[cluster_space])
    assert MethodConfig(terms=[cluster_space], clusters=16).uses_clusters


def test_token_weights_computes_every_named_selector_and_score_and_no_other():
    for selector in selection.SELECTORS:
        assert weights(selector=selector).shape == (3,)
    for reweight in selection.REWEIGHTS:
        assert weights(reweight=reweight).shape == (3,)
    for field in ("selector", "reweight", "space"):
        unnamed = WeightingConfig()
        setattr(unnamed, field, "margin")  # past the config's check
        with pytest.raises(ValueError, match=f"weighting.{field}='margin'"):
            token_weights(unnamed, Q_S.log(), P_T.log(), TOKENS)


def test_weighted_mean_computes_every_named_normalisation_and_no_other():
    per_position, w = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = {"weights": 8.0 / 3, "sequences": (1.0 + 3.5) / 2, "positions": 8.0 / 4}
    assert set(expected) == set(selection.NORMALIZATIONS)
    for normalize, value in expected.items():
        assert weighted_mean(per_position, w, normalize).item() == pytest.approx(value)
    with pytest.raises(ValueError, match="weighting.normalize='tokens'"):
        weighted_mean(per_position, w, "tokens")
