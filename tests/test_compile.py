"""torch.compile: the MoE layer (both routers, the grouped-GEMM expert path) and the whole model trace into
one graph without breaks, and a step traced through AOT autograd gives the eager losses and gradients.

    python -m pytest tests/test_compile.py -q
"""

import pytest
import torch

from model import EMO, MoE, ModelConfig
from router import document_ids


def config(router):
    return ModelConfig(vocab_size=96, eos_id=0, seq_len=32, n_layer=2, n_head=2, d_model=32, n_experts=16,
                       top_k=4, expert_hidden=16, router=router, pool_min=4, pool_max=16, doc_attention=True)


def batch():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, 96, (2, 32), generator=g)
    idx[:, 10] = 0  # an EOS: two documents per row
    return idx, idx.roll(-1, dims=1)


@pytest.mark.parametrize("router", ["emo", "std"])
def test_moe_layer_and_model_compile_without_graph_breaks(router):
    torch.manual_seed(0)
    layer = MoE(config(router), 16).train()
    idx, targets = batch()
    x = torch.randn(2, 32, 32, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x, document_ids(idx, 0))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    model = EMO(config(router)).train()
    explained = torch._dynamo.explain(model)(idx, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_step_equals_eager_step():
    """aot_eager traces forward and backward (custom ops, autograd Functions) without generating code."""
    torch.manual_seed(0)
    model = EMO(config("std")).train()
    idx, targets = batch()
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss, _ = fn(idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
