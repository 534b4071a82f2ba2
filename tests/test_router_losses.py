"""The router's losses: global load balancing (hand-computed, counts carried over a step's micro-batches, skipped
where no gradient flows) and the z-losses.

    python -m pytest tests/test_router_losses.py -q
"""

import math

import pytest
import torch

from model import ModelConfig
from router import Router, document_ids, expert_counts, load_balancing_loss, pool_mask, z_loss
from tests.test_router import EOS, batches, make_router


def test_load_balancing_loss_hand_computed():
    # 2 tokens, 3 routed experts, 1 routed expert per token
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    chosen = torch.tensor([[0], [1]])
    loss, counts = load_balancing_loss(probs, expert_counts(probs, chosen, 3), 1)
    # f = [1/2, 1/2, 0], p = [0.3, 0.45, 0.25] -> 3/1 * (0.15 + 0.225) = 1.125
    assert loss.item() == pytest.approx(1.125)
    assert counts.tolist() == [1.0, 1.0, 0.0]


def test_load_balancing_loss_skips_picks_of_probability_zero():
    # a pool of one expert: the second pick lies outside it and is no routed slot
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    counts = expert_counts(probs, torch.tensor([[0, 1]]), 3)
    loss, counts = load_balancing_loss(probs, counts, 2)
    assert counts.tolist() == [1.0, 0.0, 0.0]
    assert loss.item() == pytest.approx(3 / 2 * 1.0)


def test_load_balancing_loss_is_one_when_uniform():
    Er, kr, N = 8, 2, 16
    probs = torch.full((N, Er), 1 / Er)
    chosen = torch.arange(N * kr).view(N, kr) % Er  # every expert gets N*kr/Er tokens
    loss, _ = load_balancing_loss(probs, expert_counts(probs, chosen, Er), kr)
    assert loss.item() == 1.0


def test_counts_carried_over_a_step_equal_counting_its_micro_batches_together():
    """lb_scope 'step': a micro-batch's loss takes f_e over every micro-batch of the step so far (the earlier
    ones' counts carried, detached) and p_e over its own tokens: the direct computation over both."""
    cfg = ModelConfig(d_model=8, n_experts=9, n_shared=1, top_k=3, router="std")
    router = Router(cfg, 9).train()
    first, second = torch.randn(40, 8), torch.randn(24, 8)
    a = router(first, None)
    router.carried = torch.cat([a.expert_counts, torch.tensor([40.0])])
    b = router(second, None)
    probs_a, probs_b = router.logits(first).softmax(-1), router.logits(second).softmax(-1)
    counts = expert_counts(probs_a, a.experts[:, :2], 8) + expert_counts(probs_b, b.experts[:, :2], 8)
    direct = 8 / 2 * (counts / 64 * probs_b.mean(0)).sum()
    torch.testing.assert_close(b.lb_loss, direct)
    router.carried = None
    alone = router(second, None).lb_loss  # the micro-batch balanced on its own (lb_scope 'micro_batch')
    assert not torch.allclose(alone, direct)


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)


def test_emo_z_loss_is_over_the_pool_logits_only():
    """EMO's router z-loss is logsumexp over each token's in-pool logits (the release's), the standard
    router's over all routed logits; a direct computation of both from the router's own logits."""
    idx = batches()[0]
    ids = document_ids(idx, EOS).flatten()
    x = torch.randn(idx.numel(), 12)
    for kind in ("emo", "std"):
        router = make_router(kind, pool=(2, 5))
        router.train()
        torch.manual_seed(1)
        routing = router(x, ids)
        logits = router.logits(x)
        torch.manual_seed(1)
        sizes = router.pool_sizes(idx.numel(), "cpu")
        in_pool = pool_mask(logits.softmax(-1), ids, sizes) if kind == "emo" else torch.ones_like(logits).bool()
        expected = torch.stack([logits[n][in_pool[n]].logsumexp(0) ** 2 for n in range(len(x))]).mean()
        assert routing.z_loss.item() == pytest.approx(expected.item(), rel=1e-6)
        if kind == "emo":  # the pool makes a difference here
            assert routing.z_loss.item() < z_loss(logits).item()


def test_evaluation_and_no_grad_passes_skip_the_load_balancing_loss():
    idx = batches()[0]
    ids = document_ids(idx, EOS).flatten()
    x = torch.randn(idx.numel(), 12)
    router = make_router("std")
    router.train()
    trained = router(x, ids)
    with torch.no_grad():
        no_grad = router(x, ids)
    router.eval()
    evaluated = router(x, ids)
    assert trained.lb_loss.item() > 0
    for routing in (no_grad, evaluated):
        assert routing.lb_loss.item() == 0
        assert torch.equal(routing.expert_counts, trained.expert_counts)  # this rank's counts, still reported


def test_lb_loss_gradient_reaches_router():
    router = make_router("emo")
    router.train()
    idx = batches()[0]
    routing = router(torch.randn(idx.numel(), 12), document_ids(idx, EOS).flatten())
    (routing.lb_loss + routing.z_loss).backward()
    assert router.gate.weight.grad.abs().sum() > 0
