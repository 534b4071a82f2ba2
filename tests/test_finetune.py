"""Fine-tuning (finetune.py): the loss is the answers' cross-entropy only, with the load-balancing weight of
the release's fine-tune; routing is token by token; the schedule; a pruned model fine-tuned from the command line.

    python -m pytest tests/test_finetune.py -q
"""

import pytest
import torch
import torch.nn.functional as F

import finetune
from checkpoint import load_model
from model import EMO, ModelConfig

EOS = 0


def tiny_model():
    torch.manual_seed(0)
    return EMO(ModelConfig(vocab_size=64, eos_id=EOS, seq_len=32, n_layer=2, n_head=2, d_model=16, n_experts=8,
                           top_k=3, expert_hidden=12, pool_min=2, pool_max=7, lm_z_weight=0.0))


def demonstrations(n=6, T=24, answer=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 64, (n, T), generator=g)
    scored = torch.zeros(n, T, dtype=torch.bool)
    scored[:, -answer:] = True
    return idx, scored


def test_the_loss_is_the_answers_cross_entropy_and_load_balance_only():
    model = tiny_model()
    model.layers[0].moe.router.kind = model.layers[1].moe.router.kind = "std"  # as finetune() routes
    idx, scored = demonstrations()
    inputs, targets = finetune.answer_targets(idx, scored)
    assert torch.equal(targets == -1, ~scored[:, 1:])  # a target where the next token is an answer token
    torch.manual_seed(1)
    loss, stats = finetune.finetune_loss(model, inputs, targets, lb_weight=0.01)
    logits = model.lm_head(model.hidden_states(inputs)[0])  # the same routing: no pools drawn
    answers = targets != -1
    ce = F.cross_entropy(logits[answers], targets[answers])
    torch.testing.assert_close(stats["lm_loss"], ce)
    torch.testing.assert_close(loss, ce + 0.01 * stats["lb_loss"])  # the release's terms: no z-loss
    assert model.cfg.z_weight == 0.001 and model.cfg.lb_weight == 0.1  # the model's own config kept


def test_schedule_warms_up_then_decays_to_zero():
    cfg = finetune.FinetuneConfig(lr=1.0, warmup=0.1)
    lrs = [finetune.learning_rate(step, 20, cfg) for step in range(20)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(1 / 18)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_finetuning_lowers_the_answer_loss_and_routes_token_by_token():
    model = tiny_model()
    idx, scored = demonstrations(n=16)
    cfg = finetune.FinetuneConfig(lr=1e-2, epochs=10, batch_size=4)
    pools = []
    for block in model.layers:
        block.moe.router.register_forward_hook(lambda m, args, out: pools.append(out.pool_size.item()))
    model, losses = finetune.finetune(model, [(idx, scored)], cfg)
    assert len(losses) == 10 * 4 and sum(losses[-4:]) < 0.8 * sum(losses[:4])  # last epoch against the first
    assert set(pools) == {7.0}  # every pass routed over all 7 routed experts: no pool
    assert not model.training and {block.moe.router.kind for block in model.layers} == {"emo"}


def test_finetune_command_keeps_the_pruning_record(tiny_corpus, tiny_checkpoints, tmp_path):
    import prune
    prune.main(["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code", "--keep", "4",
                "--calib_docs", "2", "--out", str(tmp_path / "code")])
    finetune.main(["--ckpt", str(tmp_path / "code.pt"), "--data_dir", tiny_corpus[0], "--n_examples", "8",
                   "--batch_size", "4"])
    model, ckpt = load_model(str(tmp_path / "code-ft.pt"))
    assert ckpt["pruning"]["domain"] == "code" and ckpt["finetune"]["domain"] == "code"
    assert ckpt["finetune"]["examples"] == 8 and len(ckpt["finetune"]["losses"]) == 2
    assert model.cfg.n_experts == 4


def pruned_copy(model, routed_kept):
    """A copy of model pruned to the given routed experts per layer (and the shared one)."""
    import copy
    import prune
    return prune.prune_to(copy.deepcopy(model), routed_kept)


KEPT = [[1, 4, 6], [0, 2, 5]]  # original ids of the subset's routed experts, per layer (7 routed, 1 shared)


@pytest.mark.parametrize("average", [None, 0.25])
def test_merged_weights_are_the_subset_s_at_the_kept_ids_and_the_original_s_elsewhere(average):
    full = tiny_model()
    subset = pruned_copy(full, KEPT)
    with torch.no_grad():
        for p in subset.parameters():
            p.add_(1.0)  # "fine-tuned"
    merged = tiny_model()
    counts = finetune.merge_back(merged, subset, KEPT, router_rows=True, average=average)
    assert counts == {"routed": 6, "shared": 0, "router_rows": 8, "non_moe": 0}
    for block, original, small, kept in zip(merged.layers, full.layers, subset.layers, KEPT):
        for name in ("w_up_gate", "w_down"):
            got, before, after = getattr(block.moe, name), getattr(original.moe, name), getattr(small.moe, name)
            expected = after[:3] if average is None else (1 - average) * before[kept] + average * after[:3]
            torch.testing.assert_close(got[kept], expected)
            others = [e for e in range(8) if e not in kept]
            assert torch.equal(got[others], before[others])  # the other experts and the shared one (7) untouched
        rows = kept + [7]
        expected = small.moe.router.gate.weight if average is None else \
            (1 - average) * original.moe.router.gate.weight[rows] + average * small.moe.router.gate.weight
        torch.testing.assert_close(block.moe.router.gate.weight[rows], expected)
    assert torch.equal(merged.embed.weight, full.embed.weight)  # non_moe off


def test_a_subset_merged_back_unchanged_is_the_original_model():
    full = tiny_model()
    merged = tiny_model()
    finetune.merge_back(merged, pruned_copy(full, KEPT), KEPT, router_rows=True, shared=True, non_moe=True)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), full.state_dict().values()))


def test_merging_a_fine_tuned_subset_back_from_the_command_line(tiny_corpus, tiny_checkpoints, tmp_path):
    import json

    import prune
    emo = tiny_checkpoints["emo"]
    prune.main(["--ckpt", emo, "--data_dir", tiny_corpus[0], "--domain", "code", "--keep", "4", "--calib_docs", "2",
                "--out", str(tmp_path / "code")])
    finetune.main(["--ckpt", str(tmp_path / "code.pt"), "--data_dir", tiny_corpus[0], "--n_examples", "4",
                   "--out", str(tmp_path / "code-ft.pt")])
    finetune.main(["--ckpt", str(tmp_path / "code-ft.pt"), "--merge_into", "source", "--out",
                   str(tmp_path / "merged.pt"), "--hf_out", str(tmp_path / "merged_hf")])
    merged, ckpt = load_model(str(tmp_path / "merged.pt"))
    tuned, _ = load_model(str(tmp_path / "code-ft.pt"))
    kept = json.load(open(tmp_path / "code.json"))["layers"][0]["kept"]
    assert torch.equal(merged.layers[0].moe.w_up_gate[kept], tuned.layers[0].moe.w_up_gate[:3])
    assert merged.cfg.n_experts == 8 and ckpt["merge"]["n_routed_copied"] == 6
    metadata = json.load(open(tmp_path / "merged_hf" / "merge_metadata.json"))
    assert metadata["parent_model"] == emo and metadata["merge_mode"] == "replace"
