"""experiments/contrast.py: EASY-EP's factors per expert against a token-by-token loop; prune.prune_to: a model
rebuilt from a pruning record's kept sets equal to the one prune.py wrote.

    python -m pytest tests/test_contrast.py -q
"""

import copy

import torch
import torch.nn.functional as F

import prune
from checkpoint import load_model
from experiments.contrast import expert_factors
from kernels import swiglu
from tests.conftest import tokens_of


def factors_token_by_token(model, batches):
    """expert_factors computed plainly: every scored token, every routed slot, the expert's output on its own."""
    sums = [torch.zeros(block.moe.router.n_routed, 4) for block in model.layers]
    for idx, scored in batches:
        for block, (h, out, routing), total in zip(model.layers, prune.moe_calls(model, idx), sums):
            h, out, scored_flat = h.flatten(0, 1), out.flatten(0, 1), scored.flatten()
            for t in scored_flat.nonzero().flatten().tolist():
                turn = 1 - F.cosine_similarity(h[t], h[t] + out[t], dim=0)
                for slot in range(block.moe.router.k_routed):
                    e = int(routing.experts[t, slot])
                    norm = (swiglu(h[t] @ block.moe.w_up_gate[e]) @ block.moe.w_down[e]).norm()
                    total[e] += torch.stack([torch.tensor(1.0), routing.weights[t, slot], norm, turn])
    return [torch.cat([s[:, :1], s[:, 1:] / s[:, :1].clamp(min=1)], dim=1) for s in sums]


@torch.no_grad()
def test_expert_factors_equal_a_token_by_token_loop(tiny_corpus, tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["emo"])
    batches = tokens_of(tiny_corpus[0], "code", n=2)
    factors = expert_factors(model, batches)
    n_scored = sum(int(scored.sum()) for _, scored in batches)
    for block, layer in zip(model.layers, factors):
        assert layer[:, 0].sum() == n_scored * block.moe.router.k_routed  # every routed slot counted once
    for a, b in zip(factors, factors_token_by_token(model, batches)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_model_rebuilt_from_kept_sets_equals_the_pruned_one(tiny_corpus, tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["emo"])
    batches = tokens_of(tiny_corpus[0], "math")
    pruned = copy.deepcopy(model)
    layers = prune.prune(pruned, batches, 3, "greedy")
    rebuilt = prune.prune_to(copy.deepcopy(model), [layer["kept"] for layer in layers])
    assert rebuilt.cfg == pruned.cfg
    idx = batches[0][0]
    torch.testing.assert_close(rebuilt(idx), pruned(idx), rtol=0, atol=0)
