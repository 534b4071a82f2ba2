"""
The expert computation of an MoE layer: every token through its K chosen SwiGLU experts, weighted.

    y[n] = sum_k weights[n, k] * down_e( silu(x[n] @ W_gate_e) * (x[n] @ W_up_e) ),  e = experts[n, k]

The interface is the one every implementation shares:
    moe_mlp(x, w_up_gate, w_down, weights, experts) -> y
    x (N, C) tokens, w_up_gate (E, C, 2H) gate then up projections of each expert, w_down (E, H, C),
    weights (N, K) routing weights, experts (N, K) expert indices; y (N, C) in x's dtype.
The weight layout is "input x output" so that a group of tokens multiplies an expert's weight directly.

This file holds the pure-torch path, which runs on any device: sort the (token, slot) pairs by expert,
one matmul per expert group on the gathered tokens, then a weighted scatter-add back to the tokens.
It is the reference the fused Triton kernel is tested against.
"""

import torch
import torch.nn.functional as F


def sort_by_expert(experts, n_experts):
    """Group the N*K (token, slot) pairs by expert. experts (N, K) ->
    order (N*K,) slot indices grouped by expert (token order kept within a group),
    tokens (N*K,) the token of each sorted slot, counts (E,) slots per expert."""
    K = experts.shape[1]
    flat = experts.flatten()  # (N*K,) expert of each slot, slot n*K + k
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    return order, order // K, counts


def swiglu(h):
    """SwiGLU activation: h (..., 2H) gate then up halves -> (..., H)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_mlp_torch(x, w_up_gate, w_down, weights, experts):
    """Pure-torch expert computation, one matmul per expert on its sorted tokens (see the file docstring)."""
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    x_sorted = x[tokens]  # (N*K, C) a copy of each token per chosen expert, grouped by expert
    groups = x_sorted.split(counts.tolist())  # host sync: the group sizes; empty groups are fine
    # unbind, not w[e]: indexing would make backward fill a zero (E, C, 2H) gradient per expert
    experts_w1, experts_w2 = w_up_gate.unbind(0), w_down.unbind(0)
    y_sorted = torch.cat([swiglu(x_e @ w1) @ w2 for x_e, w1, w2 in zip(groups, experts_w1, experts_w2)])  # (N*K, C)
    y_sorted = y_sorted.float() * weights.flatten()[order, None].float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y_sorted)  # (N, C)
    return y.to(x.dtype)


moe_mlp = moe_mlp_torch
