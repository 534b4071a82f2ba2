"""Model tests: causality, document masking, initial loss, learning, gradients, parameter counts, the KV cache,
and that the model does not need Triton.

    python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch

from errors import UserError
from model import EMO, ModelConfig

EOS = 0


def tiny_config(**overrides):
    settings = dict(vocab_size=64, eos_id=EOS, seq_len=32, n_layer=2, n_head=2, d_model=16,
                    n_experts=8, n_shared=1, top_k=3, expert_hidden=12, pool_min=2, pool_max=7)
    settings.update(overrides)
    return ModelConfig(**settings)


def tokens(B=2, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 64, (B, T), generator=g)
    idx[:, [7, 20]] = EOS
    return idx


@pytest.mark.parametrize("router,doc_attention", [("std", False), ("emo", True), ("emo", False)])
def test_causal_with_token_routing(router, doc_attention):
    torch.manual_seed(0)
    model = EMO(tiny_config(router=router, doc_attention=doc_attention)).eval()  # eval: no pool
    idx = tokens()
    changed = idx.clone()
    t = 13
    changed[:, t] = (idx[:, t] % 63) + 1
    a = model(idx)
    b = model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_document_attention_hides_earlier_documents():
    torch.manual_seed(0)
    model = EMO(tiny_config(router="std", doc_attention=True))
    idx = tokens()  # documents [0..7], [8..20], [21..31]
    changed = idx.clone()
    changed[:, 3] = (idx[:, 3] % 63) + 1  # inside the first document
    a = model(idx)
    b = model(changed)
    assert torch.equal(a[:, 8:], b[:, 8:])
    assert not torch.allclose(a[:, 3:8], b[:, 3:8])
    plain = EMO(tiny_config(router="std", doc_attention=False))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(idx)[:, 8:], plain(changed)[:, 8:])


def test_initial_loss_close_to_uniform():
    torch.manual_seed(0)
    model = EMO(tiny_config(vocab_size=512))
    idx = torch.randint(1, 512, (4, 32))
    _, stats = model(idx, idx)
    assert abs(stats["lm_loss"].item() - math.log(512)) < 0.1


@pytest.mark.parametrize("router", ["emo", "std"])
def test_optimizer_steps_reduce_loss(router):
    torch.manual_seed(0)
    model = EMO(tiny_config(router=router))
    idx = tokens()
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradients_reach_used_experts_and_router():
    torch.manual_seed(0)
    model = EMO(tiny_config())
    idx = tokens()
    loss, stats = model(idx, idx)
    loss.backward()
    counts = stats["expert_counts"]  # per layer, (Er,) tokens per routed expert
    for layer, block in enumerate(model.layers):
        moe = block.moe
        assert moe.router.gate.weight.grad.abs().sum() > 0
        expert_grad = moe.w_up_gate.grad.abs().sum((1, 2)) + moe.w_down.grad.abs().sum((1, 2))  # (E,)
        routed = expert_grad[:7]
        assert torch.equal(routed > 0, counts[layer] > 0)
        assert expert_grad[7] > 0  # the shared expert sees every token


def test_stats_shapes_and_pool_sizes():
    torch.manual_seed(0)
    model = EMO(tiny_config())
    idx = tokens()
    _, stats = model(idx, idx)
    assert [c.shape for c in stats["expert_counts"]] == [(7,), (7,)]
    # counts: every token has 2 routed picks, minus those of weight 0 (pools smaller than 2 experts)
    assert all(c.sum() <= 2 * idx.numel() for c in stats["expert_counts"])
    assert 2 <= stats["pool_size"].item() <= 7
    model.eval()
    assert model(idx, idx)[1]["pool_size"].item() == 7


def test_parameter_counts_match_formula():
    cfg = tiny_config()
    model = EMO(cfg)
    total, active = model.num_params()
    C, V, H, L, E = cfg.d_model, cfg.vocab_size, cfg.expert_hidden, cfg.n_layer, cfg.n_experts
    per_layer_dense = 4 * C * C + E * C + 2 * C  # attention, router, two norms
    per_expert = 3 * C * H
    assert total == 2 * V * C + C + L * (per_layer_dense + E * per_expert)
    assert active == 2 * V * C + C + L * (per_layer_dense + cfg.top_k * per_expert)


def test_meta_device_build_then_init():
    with torch.device("meta"):
        model = EMO(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights()
    w = model.layers[0].moe.w_up_gate
    assert w.abs().max() <= 3 * 0.02 and 0.015 < w.std() < 0.025
    assert (model.norm.weight == 1).all()


@pytest.mark.parametrize("bad,message", [
    (dict(top_k=1), "top_k"),
    (dict(router="dense"), "router"),
    (dict(pool_min=5, pool_max=3), "pool_min"),
    (dict(d_model=15), "d_model"),
    (dict(eos_id=64), "eos_id"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(UserError, match=message):
        tiny_config(**bad)


def test_generate_appends_tokens():
    torch.manual_seed(0)
    model = EMO(tiny_config()).eval()
    out = model.generate(tokens()[:, :5], max_new_tokens=4, sample_top_k=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], tokens()[:, :5])


def test_model_loss_is_cross_entropy_plus_weighted_auxiliary_losses():
    torch.manual_seed(0)
    model = EMO(tiny_config(vocab_size=300, lm_z_weight=1e-2, router="std"))  # chunks: tests/test_lm_loss.py
    idx = torch.randint(1, 300, (3, 600))
    targets = idx.roll(-1, dims=1)
    targets[:, -5:] = -1
    logits = model(idx)
    _, stats = model.hidden_states(idx)
    loss, stats_t = model(idx, targets)
    flat, t = logits.flatten(0, 1), targets.flatten()
    ce = torch.nn.functional.cross_entropy(flat, t, ignore_index=-1)
    z = torch.logsumexp(flat, -1)[t != -1].square().mean()
    torch.testing.assert_close(stats_t["lm_loss"], ce)
    expected = ce + 0.1 * stats["lb_loss"] + 0.001 * stats["z_loss"] + 1e-2 * z
    torch.testing.assert_close(loss, expected)


def test_activation_checkpointing_gives_the_same_step():
    """Recomputing each block in the backward (parallel.py's checkpoint_blocks; the pools redrawn from the same
    RNG state) changes nothing."""
    from parallel import checkpoint_blocks
    torch.manual_seed(0)
    plain = EMO(tiny_config(router="emo", doc_attention=True))
    checkpointed = EMO(plain.cfg)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    idx = tokens()
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss, _ = model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("doc_attention", [False, True])
def test_cached_generation_equals_uncached(doc_attention):
    """Greedy decoding with the KV cache gives the tokens of recomputing the whole context every step, also
    across an EOS (document mask) and past seq_len (where the window slides)."""
    torch.manual_seed(0)
    model = EMO(tiny_config(doc_attention=doc_attention, seq_len=24)).eval()
    prompt = tokens()[:, :10]  # an EOS at position 7
    cached = model.generate(prompt, max_new_tokens=30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (2, 40) and torch.equal(cached, uncached)


def test_cache_gives_the_logits_of_the_whole_sequence():
    from model import KVCache
    torch.manual_seed(0)
    model = EMO(tiny_config(doc_attention=True)).eval()
    idx = tokens()[:, :20]
    full = model(idx)
    cache = KVCache(model.cfg, 2, "cpu", torch.float32)
    pieces = [model(idx[:, :12], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_importing_the_model_does_not_import_triton():
    """Triton is the third expert path, imported only when chosen (kernels.moe_mlp_triton)."""
    import os
    import subprocess
    import sys
    code = "import sys, model, train, prune, experiments.sweep; print('triton' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
