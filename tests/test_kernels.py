"""Expert-computation tests: the pure-torch path against a dense reference, values and gradients.

    python -m pytest tests/test_kernels.py -q
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import moe_mlp_torch, sort_by_expert


def dense_reference(x, w_up_gate, w_down, weights, experts):
    """Every expert on every token, weighted by a dense (N, E) routing matrix that is 0 where not chosen."""
    E, H = w_up_gate.shape[0], w_down.shape[1]
    dense_weights = torch.zeros(x.shape[0], E, dtype=weights.dtype).scatter_add(1, experts, weights)  # (N, E)
    h = torch.einsum("nc,ech->neh", x, w_up_gate)  # (N, E, 2H)
    act = F.silu(h[..., :H]) * h[..., H:]  # (N, E, H)
    y = torch.einsum("neh,ehc->nec", act, w_down)  # (N, E, C)
    return (y * dense_weights[..., None]).sum(1)


def problem(N, C, H, E, K, seed=0, skip_experts=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    w_up_gate = torch.randn(E, C, 2 * H, generator=g) / C ** 0.5
    w_down = torch.randn(E, H, C, generator=g) / H ** 0.5
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    scores = torch.rand(N, len(allowed), generator=g)
    experts = allowed[scores.topk(K, dim=1).indices]  # (N, K) distinct experts per token
    weights = torch.rand(N, K, generator=g)
    return [t.requires_grad_(t.is_floating_point()) for t in (x, w_up_gate, w_down, weights, experts)]


@pytest.mark.parametrize("N,C,H,E,K,skip", [
    (37, 16, 24, 8, 3, (2, 5)),  # experts 2 and 5 receive no tokens
    (1, 8, 8, 4, 2, ()),  # a single token
    (64, 12, 20, 16, 4, tuple(range(8, 16))),  # half the experts empty
])
def test_torch_path_equals_dense_reference(N, C, H, E, K, skip):
    inputs = problem(N, C, H, E, K, skip_experts=skip)
    y = moe_mlp_torch(*inputs)
    y_ref = dense_reference(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs[:4], grad)
    grads_ref = torch.autograd.grad(y_ref, inputs[:4], grad)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    for e in skip:  # an expert with no tokens gets an exact zero gradient
        assert (grads[1][e] == 0).all() and (grads[2][e] == 0).all()


def test_sort_by_expert_groups_slots():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, tokens, counts = sort_by_expert(experts, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert experts.flatten()[order].tolist() == [0, 0, 1, 1, 2, 2]
    assert tokens.tolist() == [0, 1, 1, 2, 0, 2]  # token order kept inside each group


def test_torch_path_keeps_dtype():
    x, w1, w2, weights, experts = problem(10, 8, 8, 4, 2)
    y = moe_mlp_torch(x.detach().bfloat16(), w1.detach().bfloat16(), w2.detach().bfloat16(), weights, experts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), dense_reference(x, w1, w2, weights, experts), rtol=5e-2, atol=5e-2)
