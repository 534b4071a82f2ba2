"""Exports in the release's Hugging Face format: export/load round trips (whole, sharded, pruned with equal or
per-layer counts), and a pruned export computed as the release's code would.

    python -m pytest tests/test_export.py -q
"""

import json

import pytest
import tiktoken
import torch
from safetensors.torch import load_file

import prune
from hf import export_hf, load_hf, pad_id
from tests.test_hf import V, reference_forward, tiny_model


@pytest.mark.parametrize("layers_per_shard", [4, 1])  # one file, and shards with an index
def test_export_then_load_gives_identical_logits(tmp_path, layers_per_shard):
    model = tiny_model()
    idx = torch.randint(0, V, (2, 12))
    export_hf(model, str(tmp_path / "full"), layers_per_shard=layers_per_shard)
    assert (tmp_path / "full" / "model.safetensors.index.json").exists() == (layers_per_shard == 1)
    loaded = load_hf(str(tmp_path / "full"))
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("method", ["greedy", "global_budget"])
def test_export_then_load_a_pruned_model(tmp_path, method):
    """Layer-wise methods keep the same count everywhere; global_budget may keep different counts per
    layer (num_experts_per_layer), which load back into the same model."""
    model = tiny_model()
    batches = [(torch.randint(0, V, (1, 12)), torch.ones(1, 12, dtype=torch.bool)) for _ in range(3)]
    prune.prune(model, batches, 3, method)  # 2 routed + the shared expert per layer (on average for global)
    export_hf(model, str(tmp_path / "pruned"))
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    sizes = [block.moe.w_up_gate.shape[0] for block in model.layers]
    assert config["num_experts_per_layer"] == sizes and sum(sizes) == 3 * 3
    assert config["num_experts_per_tok"] == min(3, max(sizes))
    loaded = load_hf(str(tmp_path / "pruned"))
    assert loaded.cfg == model.cfg
    idx = torch.randint(0, V, (2, 12))
    assert torch.equal(loaded(idx), model(idx))


def test_a_pruned_export_computes_as_the_release_code_would(tmp_path):
    """A pruned export read as plain tensors and config.json, run by the reference forward (the release's
    semantics: its one num_experts_per_tok), gives the pruned model's logits; config.json carries the
    release's auto_map and names and the pad id of a tokenizer that has one."""
    model = tiny_model()
    batches = [(torch.randint(0, V, (1, 12)), torch.ones(1, 12, dtype=torch.bool)) for _ in range(3)]
    prune.prune(model, batches, 4, "greedy")  # 3 routed + the shared expert in every layer
    export_hf(model, str(tmp_path / "pruned"))
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_emo.EmoConfig",
                                  "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"}
    assert config["architectures"] == ["EmoForCausalLM"] and config["model_type"] == "emo"
    assert config["num_experts"] == 4 and config["pad_token_id"] is None  # no tokenizer given
    tensors = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    idx = torch.randint(0, 49, (10,))  # one document (49 is EOS)
    reference = reference_forward(tensors, idx, top_k=config["num_experts_per_tok"])
    torch.testing.assert_close(model(idx[None])[0], reference, rtol=1e-4, atol=1e-4)
    padded = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                               special_tokens={"<|endoftext|>": 256, "<|pad|>": 257})
    assert pad_id(padded) == 257 and pad_id(tiktoken.Encoding("plain", pat_str=r"\S+", mergeable_ranks={
        bytes([b]): b for b in range(256)}, special_tokens={})) is None
