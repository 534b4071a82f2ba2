"""Exports in the release's Hugging Face format: export/load round trips (whole, sharded, pruned with equal or
per-layer counts), a pruned export computed as the release's code would (a layer below top_k included), the
release's pruning record per method, and transformers' AutoTokenizer on an export.

    python -m pytest tests/test_export.py -q
"""

import json

import pytest
import tiktoken
import torch
import transformers
from safetensors.torch import load_file

import prune
from checkpoint import load_model, main as checkpoint_main
from data.tokenizer import from_record
from hf import export_hf, load_hf, pad_id, release_pruning_metadata
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
    assert config["num_experts_per_tok"] == min(3, min(sizes))
    loaded = load_hf(str(tmp_path / "pruned"))
    assert loaded.cfg == model.cfg
    idx = torch.randint(0, V, (2, 12))
    assert torch.equal(loaded(idx), model(idx))


def test_a_layer_below_top_k_lowers_top_k_as_the_release_does(tmp_path):
    """Layers of 2, 4 and 3 experts with top_k 3: the config's num_experts_per_tok becomes 2, the smallest
    layer's count, as the release's variable-count script writes it; the release's semantics (one top_k for
    every layer) then run the export, and nanoEMO computes the same."""
    model = tiny_model()
    prune.prune_to(model, ([0], [1, 4, 6], [2, 5]))
    assert model.cfg.top_k == 2 and model.cfg.layer_experts() == [2, 4, 3]
    export_hf(model, str(tmp_path / "pruned"))
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_experts_per_layer"] == [2, 4, 3] and config["num_experts_per_tok"] == 2
    idx = torch.randint(0, 49, (10,))
    tensors = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    reference = reference_forward(tensors, idx, top_k=config["num_experts_per_tok"])
    torch.testing.assert_close(model(idx[None])[0], reference, rtol=1e-4, atol=1e-4)


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


RELEASE_FIELDS = {  # what each of the release's pruning scripts writes in pruning_metadata.json
    "greedy": {"original_model", "prune_keep_k", "num_shared_experts", "pruning_method", "task", "split",
               "num_shots_override", "num_calibration", "prune_seed", "experts_kept_per_layer"},
    "global": {"original_model", "prune_keep_k", "num_shared_experts", "activation_file", "experts_kept_per_layer"},
    "easy_ep": {"original_model", "prune_keep_k", "num_shared_experts", "pruning_method", "task", "split",
                "num_calibration", "num_shots_override", "prune_seed", "experts_kept_per_layer"},
    "random": {"original_model", "prune_keep_k", "num_shared_experts", "pruning_method", "seed",
               "experts_kept_per_layer"},
}
RELEASE_FIELDS["frequency"] = RELEASE_FIELDS["global"]
VARIABLE_FIELDS = {"original_model", "keep_k_per_layer", "num_shared_experts", "pruning_method", "task", "split",
                   "num_calibration", "prune_seed", "experts_kept_per_layer"}


@pytest.mark.parametrize("method", sorted(RELEASE_FIELDS))
def test_pruning_metadata_has_the_fields_of_the_release_script_for_the_method(tiny_corpus, tiny_checkpoints,
                                                                              tmp_path, method):
    prune.main(["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code", "--keep", "4",
                "--calib_docs", "2", "--method", method, "--out", str(tmp_path / "p"), "--hf_out",
                str(tmp_path / "hf")])
    metadata = json.loads((tmp_path / "hf" / "pruning_metadata.json").read_text())
    assert set(metadata) == RELEASE_FIELDS[method]
    record = json.loads((tmp_path / "p.json").read_text())
    assert metadata["experts_kept_per_layer"] == [layer["kept"] + [7] for layer in record["layers"]]
    assert metadata.get("prune_keep_k") == 4 and metadata["original_model"] == tiny_checkpoints["emo"]
    assert metadata.get("split", "calib") == "calib" and metadata.get("task", "code") == "code"


def test_per_layer_counts_get_the_release_variable_script_fields():
    record = {"method": "global_budget", "domain": "code", "split": "calib", "calib_examples": 16, "source": "m"}
    metadata = release_pruning_metadata(record, tiny_model().cfg, [[0, 7], [1, 2, 3, 7], [4, 5, 7]])
    assert set(metadata) == VARIABLE_FIELDS and metadata["keep_k_per_layer"] == [2, 4, 3]
    assert metadata["pruning_method"] == "global_budget" and metadata["num_calibration"] == 16


def test_transformers_autotokenizer_loads_an_export(tiny_checkpoints, tmp_path):
    """AutoTokenizer.from_pretrained(export), the call the release's scripts make, gives the checkpoint's
    tokenizer's ids, <|endoftext|> read as the EOS token as sample.py reads a prompt, with eos and pad set and
    no token_type_ids (so that model.generate(**tokenizer(text, return_tensors="pt")) runs)."""
    checkpoint_main(["--ckpt", tiny_checkpoints["emo"], "--hf_out", str(tmp_path / "hf")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encoding = from_record(load_model(tiny_checkpoints["emo"])[1]["tokenizer"])
    for text in ("def f(x):\n    return x + 1  # code", "Größere Häuser über die Straße", "emoji 🙂🚀 ok",
                 "end<|endoftext|>next document"):
        assert tokenizer(text)["input_ids"] == encoding.encode(text, allowed_special="all"), text
    assert tokenizer.eos_token_id == encoding.eot_token == 319 and tokenizer.pad_token_id == 319
    assert set(tokenizer("x", return_tensors="pt")) == {"input_ids", "attention_mask"}
    assert tokenizer.decode(encoding.encode("Größere Häuser 🙂")) == "Größere Häuser 🙂"
