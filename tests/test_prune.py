"""prune.py: pruned models against masked full models, file sizes, which experts each method keeps (streamed
greedy against full passes, global, composition, random), and bad inputs.

    python -m pytest tests/test_prune.py -q
"""

import copy
import json
import os

import numpy as np
import pytest
import torch

import prune
from checkpoint import load_model, save_checkpoint
from data.corpus import Corpus
from errors import UserError
from model import EMO, ModelConfig
from tests.conftest import as_batches, tokens_of


def masked_full_logits(full, kept_per_layer, idx):
    """The full model's logits with the router logits of the removed routed experts set to -inf."""
    model = copy.deepcopy(full)
    for block, kept in zip(model.layers, kept_per_layer):
        router = block.moe.router
        removed = torch.ones(router.n_routed, dtype=torch.bool)
        removed[kept] = False
        original = router.logits
        router.logits = lambda x, original=original, removed=removed: original(x).masked_fill(removed, float("-inf"))
    return model(idx)


@pytest.mark.parametrize("router", ["emo", "std"])
@pytest.mark.parametrize("method", prune.METHODS)
def test_pruned_logits_equal_masked_full_model(tiny_corpus, tiny_checkpoints, router, method):
    full, _ = load_model(tiny_checkpoints[router])
    batches = tokens_of(tiny_corpus[0], "code")
    idx = torch.cat([b[0][:, :20] for b in tokens_of(tiny_corpus[0], "math", n=2)])
    for keep in (8, 4, 2):  # 8 = every expert: the model itself
        pruned = copy.deepcopy(full)
        layers = prune.prune(pruned, batches, keep, method)
        kept = [layer["kept"] for layer in layers]
        sizes = [block.moe.w_up_gate.shape[0] for block in pruned.layers]
        assert sizes == pruned.cfg.layer_experts() == [len(k) + 1 for k in kept]
        if method == "global_budget":  # the budget is shared between layers, each keeping at least one routed expert
            assert sum(sizes) == 2 * keep and min(sizes) >= 2
        else:
            assert sizes == [keep, keep] and pruned.cfg.n_experts == keep
        assert pruned.cfg.top_k == min(3, max(sizes))
        logits = pruned(idx)
        if keep == 8:
            assert torch.equal(logits, full(idx))
        torch.testing.assert_close(logits, masked_full_logits(full, kept, idx), rtol=1e-5, atol=1e-5)


def test_pruned_checkpoints_shrink_with_the_experts_removed(tiny_corpus, tiny_checkpoints, tmp_path):
    full, ckpt = load_model(tiny_checkpoints["emo"])
    sizes = {}
    for keep in (8, 4, 2):
        model = copy.deepcopy(full)
        prune.prune(model, tokens_of(tiny_corpus[0], "code"), keep, "global")
        path = str(tmp_path / f"keep{keep}.pt")
        save_checkpoint(path, {"model_config": {}, "model": model.state_dict()})
        sizes[keep] = (os.path.getsize(path), sum(p.numel() for p in model.parameters()))
    for keep in (4, 2):
        bytes_ratio = sizes[keep][0] / sizes[8][0]
        params_ratio = sizes[keep][1] / sizes[8][1]
        assert bytes_ratio == pytest.approx(params_ratio, rel=0.02) and params_ratio < 1


def two_domain_batches(domain):
    """Calibration batches of domain A use tokens 0..49 only, of domain B tokens 50..99."""
    low = 0 if domain == "A" else 50
    g = np.random.default_rng(0 if domain == "A" else 1)
    return as_batches([g.integers(low, low + 50, size=30) for _ in range(4)])


def routed_by_design():
    """A model whose routers send tokens 0..49 to experts {0, 1} and tokens 50..99 to {2, 3}: embeddings
    point along u or v, attention adds nothing, experts add little, router rows 0-1 follow u, 2-3 follow v."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, eos_id=99, seq_len=32, n_layer=2, n_head=2, d_model=16, n_experts=8,
                      n_shared=1, top_k=3, expert_hidden=8, router="std")
    model = EMO(cfg).eval()
    u, v = torch.zeros(16), torch.zeros(16)
    u[:8], v[8:] = 1.0, 1.0
    with torch.no_grad():
        model.embed.weight[:50] = u + 0.01 * torch.randn(50, 16)
        model.embed.weight[50:] = v + 0.01 * torch.randn(50, 16)
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.moe.w_down.mul_(1e-2)
            gate = block.moe.router.gate.weight
            gate.zero_()
            gate[0], gate[1], gate[2], gate[3] = 5 * u, 4 * u, 5 * v, 4 * v
    return model


@pytest.mark.parametrize("method", ["greedy", "global", "frequency", "easy_ep"])
def test_selection_keeps_the_experts_a_domain_uses(method):
    for domain, expected in (("A", [0, 1]), ("B", [2, 3])):
        model = routed_by_design()
        batches = two_domain_batches(domain)
        layers = prune.prune(model, batches, 3, method)  # 2 routed + the shared one
        assert [layer["kept"] for layer in layers] == [expected, expected]


def test_scores_of_stacked_batches_equal_one_batch_at_a_time(tiny_corpus, tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["emo"])
    text = Corpus(tiny_corpus[0]).domain_tokens("val", "code")
    batches = as_batches([text[32 * i:32 * (i + 1)] for i in range(5)])
    stacked = [(torch.cat([idx for idx, _ in group]), torch.cat([scored for _, scored in group]))
               for group in (batches[:3], batches[3:])]  # (3, 32) and (2, 32)
    for method in ("global", "frequency", "easy_ep"):
        one_at_a_time = [torch.zeros(block.moe.router.n_routed) for block in model.layers]
        n_tokens = sum(int(scored.sum()) for _, scored in batches)
        for batch in batches:  # one sequence at a time
            for total, score in zip(one_at_a_time, prune.expert_scores(model, [batch], method)):
                total += score * int(batch[1].sum()) / n_tokens
        for a, b in zip(prune.expert_scores(model, stacked, method), one_at_a_time):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def greedy_by_full_passes(model, batches, n_routed):
    """The layer-wise greedy method computed plainly: for each layer, the whole model run on the calibration
    batches with the layers before it already pruned."""
    records = []
    for i, block in enumerate(model.layers):
        scores = prune.expert_scores(model, batches, "greedy")[i]
        records.append(prune.keep_best(block.moe, [scores], n_routed))
    return records


@pytest.mark.parametrize("router", ["emo", "std"])
def test_streamed_greedy_equals_full_passes_and_runs_each_layer_once(tiny_corpus, tiny_checkpoints, router):
    model, _ = load_model(tiny_checkpoints[router])
    batches = tokens_of(tiny_corpus[0], "math", n=3)
    reference = copy.deepcopy(model)
    calls = [0] * len(model.layers)
    for i, block in enumerate(model.layers):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    for n_routed in (3, 1):
        streamed = prune.greedy_layerwise(model, [batches], n_routed)
        assert calls == [len(batches)] * len(model.layers)  # each layer once per batch
        calls[:] = [0] * len(model.layers)
        assert streamed == greedy_by_full_passes(reference, batches, n_routed)  # the same scores, the same sets
    idx = batches[0][0]
    assert torch.equal(model(idx), reference(idx))


def test_global_keeps_the_top_of_each_layer_from_one_pass(monkeypatch):
    """The release's global: each layer's top (keep - shared) experts by one pass's scores, the same count in
    every layer; global_budget lets a layer of high scores keep more."""
    scores = [torch.tensor([0.9, 0.8, 0.7, 0.01, 0.02, 0.03, 0.04]),
              torch.tensor([0.1, 0.3, 0.2, 0.15, 0.0, 0.05, 0.1])]
    passes = []
    monkeypatch.setattr(prune, "expert_scores", lambda model, batches, method: passes.append(method) or scores)
    layers = prune.prune(routed_by_design(), [], 3, "global")
    assert passes == ["global"] and [layer["kept"] for layer in layers] == [[0, 1], [1, 2]]
    layers = prune.prune(routed_by_design(), [], 3, "global_budget")  # 4 routed in all: 3 + 1
    assert [layer["kept"] for layer in layers] == [[0, 1, 2], [1]]


@pytest.mark.parametrize("method", ["greedy", "global"])
def test_composed_domains_keep_both_and_equal_the_masked_full_model(method):
    """Composing A (experts 0, 1) and B (experts 2, 3): the union keeps all four routed experts in every layer,
    and the composed model's logits are the full model's with the other experts' router logits at -inf."""
    full = routed_by_design()
    composed = copy.deepcopy(full)
    layers = prune.prune_composed(composed, [two_domain_batches("A"), two_domain_batches("B")], 3, method)
    kept = [layer["kept"] for layer in layers]
    assert kept == [[0, 1, 2, 3], [0, 1, 2, 3]] and composed.cfg.n_experts == 5
    idx = torch.cat([two_domain_batches("A")[0][0], two_domain_batches("B")[0][0]])
    torch.testing.assert_close(composed(idx), masked_full_logits(full, kept, idx), rtol=1e-5, atol=1e-5)
    # at the budget of one domain: the best two by the mean of both domains' scores
    shared = prune.prune_composed(routed_by_design(), [two_domain_batches("A"), two_domain_batches("B")], 3,
                                  method, compose="mean")
    assert all(len(layer["kept"]) == 2 for layer in shared)


def test_random_selection_is_a_seeded_control():
    model_a, model_b = routed_by_design(), routed_by_design()
    batches = two_domain_batches("A")
    first = prune.prune(model_a, batches, 3, "random", seed=5)
    second = prune.prune(model_b, batches, 3, "random", seed=5)
    assert first == second and all(len(layer["kept"]) == 2 for layer in first)


@pytest.mark.parametrize("args,message", [
    (["--keep", "0.0"], "a fraction must be in"),
    (["--keep", "1.5"], "a fraction must be in"),
    (["--keep", "0"], "at least 1 is needed"),
    (["--keep", "1"], "keep at least one routed expert"),
    (["--keep", "0.01"], "at least 1 is needed"),
    (["--keep", "9"], "only 8 experts"),
    (["--keep", "0.5", "--domain", "klingon"], "unknown domain 'klingon'"),
    (["--keep", "0.5", "--calib_docs", "0"], "at least one calibration example"),
])
def test_bad_prune_inputs_write_nothing(tiny_corpus, tiny_checkpoints, tmp_path, args, message):
    argv = ["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code",
            "--out", str(tmp_path / "x")] + args
    with pytest.raises(UserError, match=message):
        prune.main(argv)
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint_is_a_clear_error(tiny_corpus, tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        prune.main(["--ckpt", str(tmp_path / "none"), "--data_dir", tiny_corpus[0], "--domain", "code",
                    "--keep", "0.5"])


def test_pruning_again_must_be_consistent(tiny_corpus, tiny_checkpoints, tmp_path):
    base = ["--data_dir", tiny_corpus[0], "--method", "global", "--calib_docs", "2"]
    prune.main(["--ckpt", tiny_checkpoints["emo"], "--domain", "code", "--keep", "0.5",
                "--out", str(tmp_path / "half"), *base])
    record = json.load(open(tmp_path / "half.json"))
    assert record["keep"] == 4 and all(len(layer["kept"]) == 3 for layer in record["layers"])
    with pytest.raises(UserError, match="already pruned for 'code'"):
        prune.main(["--ckpt", str(tmp_path / "half.pt"), "--domain", "math", "--keep", "0.25",
                    "--out", str(tmp_path / "bad"), *base])
    with pytest.raises(UserError, match="keeps 4 experts in a layer, it cannot keep 6"):
        prune.main(["--ckpt", str(tmp_path / "half.pt"), "--domain", "code", "--keep", "0.75",
                    "--out", str(tmp_path / "bad"), *base])
    assert not os.path.exists(tmp_path / "bad.pt")
    # consistent: the same domain, fewer experts; the record keeps the original expert ids
    prune.main(["--ckpt", str(tmp_path / "half.pt"), "--domain", "code", "--keep", "0.25",
                "--out", str(tmp_path / "quarter"), *base])
    quarter = json.load(open(tmp_path / "quarter.json"))
    for before, after in zip(record["layers"], quarter["layers"]):
        assert set(after["kept"]) <= set(before["kept"]) and len(after["kept"]) == 1
    model, _ = load_model(str(tmp_path / "quarter.pt"))
    assert model.cfg.n_experts == 2 and model.cfg.top_k == 2
