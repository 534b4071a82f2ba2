"""Hugging Face checkpoints: a folder written by hand in the release's format against an independent reference
forward, the release's training settings, and clear errors on malformed checkpoints (exports: test_export.py).

    python -m pytest tests/test_hf.py -q
"""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import prune
from checkpoint import load_model
from errors import UserError
from hf import export_hf, load_hf
from model import EMO, ModelConfig

V, C, L, NH, E, K, H = 50, 16, 2, 2, 6, 3, 8  # vocab, width, layers, heads, experts (1 shared), top-k, hidden


def release_config(**overrides):
    config = {"model_type": "emo", "hidden_size": C, "intermediate_size": H, "num_hidden_layers": L,
              "num_attention_heads": NH, "num_key_value_heads": NH, "num_experts": E, "num_experts_per_tok": K,
              "num_shared_experts": 1, "norm_topk_prob": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-6,
              "vocab_size": V, "eos_token_id": 49, "pad_token_id": 48, "tie_word_embeddings": False,
              "torch_dtype": "float32"}
    config.update(overrides)
    return config


def release_tensors(seed=0):
    """Every tensor of the release's format, named and shaped by hand from docs/method.md."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    tensors = {"model.embed_tokens.weight": rand(V, C), "lm_head.weight": rand(V, C),
               "model.norm.weight": 1 + rand(C)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors[p + "pre_attention_layernorm.weight"] = 1 + rand(C)
        tensors[p + "pre_feedforward_layernorm.weight"] = 1 + rand(C)
        for name in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{name}_proj.weight"] = rand(C, C)
        tensors[p + "mlp.gate.weight"] = rand(E, C) * 5
        for j in range(E):
            tensors[p + f"mlp.experts.{j}.gate_proj.weight"] = rand(H, C)
            tensors[p + f"mlp.experts.{j}.up_proj.weight"] = rand(H, C)
            tensors[p + f"mlp.experts.{j}.down_proj.weight"] = rand(C, H)
    return tensors


def write_release(folder, tensors, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def reference_forward(t, idx, theta=500000.0, eps=1e-6, top_k=K):
    """An independent forward of the release's architecture, token by token routing, written from the
    description: pre-norm RMSNorm, RoPE (halves rotated), causal attention, softmax over a layer's routed
    experts (5 here, as many as its router has rows but the shared one), top_k - 1 of them, weights not
    renormalised, shared expert (last) with weight 1: one top_k for every layer, as the release's code."""
    T, hd = len(idx), C // NH
    n_layers = len({name.split(".")[2] for name in t if name.startswith("model.layers.")})

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.cat([pos * freqs, pos * freqs], dim=-1)  # (T, hd)

    def rope(x):  # (T, hd)
        half = hd // 2
        return x * angle.cos() + torch.cat([-x[:, half:], x[:, :half]], dim=-1) * angle.sin()

    x = t["model.embed_tokens.weight"][idx]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        n_experts = len(t[p + "mlp.gate.weight"])
        h = rms(x, t[p + "pre_attention_layernorm.weight"])
        q, k, v = (h @ t[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        heads = []
        for n in range(NH):
            s = slice(n * hd, (n + 1) * hd)
            scores = rope(q[:, s]) @ rope(k[:, s]).T / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, s])
        x = x + torch.cat(heads, dim=-1) @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "pre_feedforward_layernorm.weight"])
        out = torch.zeros_like(x)
        for n in range(T):
            probs = (h[n] @ t[p + "mlp.gate.weight"][:n_experts - 1].T).softmax(-1)
            top = probs.topk(top_k - 1)
            chosen = list(zip(top.indices.tolist(), top.values.tolist())) + [(n_experts - 1, 1.0)]
            for j, weight in chosen:
                e = p + f"mlp.experts.{j}."
                act = torch.nn.functional.silu(h[n] @ t[e + "gate_proj.weight"].T) * (h[n] @ t[e + "up_proj.weight"].T)
                out[n] += weight * (act @ t[e + "down_proj.weight"].T)
        x = x + out
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_release_format_loads_and_matches_a_reference_forward(tmp_path):
    tensors = release_tensors()
    folder = write_release(tmp_path / "release", tensors, release_config())
    model = load_hf(folder)
    assert model.cfg.n_experts == E and model.cfg.top_k == K and model.cfg.eos_id == 49
    one_document = torch.tensor([3, 17, 12, 8, 22, 40, 1, 9])
    logits = model(one_document[None])[0]
    torch.testing.assert_close(logits, reference_forward(tensors, one_document), rtol=1e-4, atol=1e-4)
    # the generic loader recognises the folder
    assert torch.equal(load_model(folder)[0](one_document[None])[0], logits)


def test_a_release_folder_computes_as_the_release_code_across_documents(tmp_path):
    """EMO trains with attention masked within documents, but the release's code serves with a causal mask:
    by default a Hugging Face folder does the same on a prompt with an EOS inside (and in generation); with
    eval_doc_attention=True it masks within documents at inference too, and differs after the EOS."""
    tensors = release_tensors()
    folder = write_release(tmp_path / "release", tensors, release_config())
    model = load_hf(folder)
    assert model.cfg.doc_attention and not model.cfg.eval_doc_attention  # trains masked, serves causal
    two_documents = torch.tensor([3, 17, 49, 8, 22, 40, 1, 9])
    reference = reference_forward(tensors, two_documents)
    torch.testing.assert_close(model(two_documents[None])[0], reference, rtol=1e-4, atol=1e-4)
    masked = load_hf(folder, eval_doc_attention=True)(two_documents[None])[0]
    torch.testing.assert_close(masked[:3], reference[:3], rtol=1e-4, atol=1e-4)  # the first document alike
    assert not torch.allclose(masked[3:], reference[3:], rtol=1e-2, atol=1e-2)
    prompt = two_documents[None, :5]
    greedy = [int(reference_forward(tensors, two_documents[:5])[-1].argmax())]
    assert model.generate(prompt, 1, temperature=0)[0, -1].item() == greedy[0]  # cached decoding likewise


def test_the_dtype_is_read_from_either_key(tmp_path):
    """transformers writes "dtype" since 4.56, "torch_dtype" before: both are read."""
    tensors = {k: v.bfloat16() for k, v in release_tensors().items()}
    for key in ("dtype", "torch_dtype"):
        folder = write_release(tmp_path / key, tensors, release_config(**{key: "bfloat16"}))
        assert next(load_hf(folder).parameters()).dtype == torch.bfloat16


def test_checkpoint_dtype_is_kept_unless_asked(tmp_path):
    tensors = {k: v.bfloat16() for k, v in release_tensors().items()}
    folder = write_release(tmp_path / "bf16", tensors, release_config(torch_dtype="bfloat16"))
    assert next(load_hf(folder).parameters()).dtype == torch.bfloat16
    assert next(load_hf(folder, dtype=torch.float32).parameters()).dtype == torch.float32


def tiny_model():
    """A small model that attends causally at inference, as every Hugging Face folder loads."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, eos_id=49, seq_len=16, n_layer=3, n_head=NH, d_model=C, n_experts=8,
                      n_shared=1, top_k=3, expert_hidden=H, rope_theta=500000.0, eval_doc_attention=False)
    return EMO(cfg).eval()


def test_release_folders_get_the_release_training_settings(tmp_path):
    """config.json holds no training settings: a release folder gets the release's (EMO: pools [top_k, E],
    document mask, LM z-loss 1e-5; StdMoE: standard router, no mask); a nanoEMO export keeps its own."""
    tensors = release_tensors()
    emo = load_hf(write_release(tmp_path / "Emo_1b14b_1T", tensors, release_config())).cfg
    assert (emo.router, emo.pool_min, emo.pool_max, emo.doc_attention, emo.lm_z_weight) == ("emo", K, E, True, 1e-5)
    std = load_hf(write_release(tmp_path / "StdMoE_1b14b_1T", tensors, release_config())).cfg
    assert (std.router, std.doc_attention) == ("std", False)
    model = tiny_model()
    model.cfg.pool_min, model.cfg.lb_weight = 5, 0.05
    export_hf(model, str(tmp_path / "ours"))
    assert load_hf(str(tmp_path / "ours")).cfg == model.cfg


def test_malformed_checkpoints_name_what_is_wrong(tmp_path):
    good = release_tensors()
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.experts.4.up_proj.weight"}
    with pytest.raises(UserError, match="model.layers.1.mlp.experts.4.up_proj.weight"):
        load_hf(write_release(tmp_path / "missing", missing, release_config()))
    wrong = dict(good, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(C, C + 1)})
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.k_proj.weight.*\(16, 17\).*\(16, 16\)"):
        load_hf(write_release(tmp_path / "wrong", wrong, release_config()))
    for overrides, message in [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"num_experts_per_layer": [6, 4, 6]}, "num_experts_per_layer has 3 entries for 2 layers"),
        ({"num_shared_experts_per_layer": [1, 2]}, "num_shared_experts_per_layer"),
    ]:
        with pytest.raises(UserError, match=message):
            load_hf(write_release(tmp_path / "config", good, release_config(**overrides)))
    config = release_config()
    del config["intermediate_size"]
    with pytest.raises(UserError, match="missing key 'intermediate_size'"):
        load_hf(write_release(tmp_path / "nokey", good, config))


def test_folder_without_tensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release_config()))
    with pytest.raises(UserError, match="neither model.safetensors"):
        load_hf(str(tmp_path))


def test_prune_accepts_a_release_folder(tmp_path, tiny_corpus):
    corpus_dir = tiny_corpus[0]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, eos_id=319, seq_len=32, n_layer=2, n_head=2, d_model=16, n_experts=8,
                      n_shared=1, top_k=3, expert_hidden=8)
    export_hf(EMO(cfg), str(tmp_path / "release"))
    prune.main(["--init_from", str(tmp_path / "release"), "--data_dir", corpus_dir, "--domain", "code",
                "--keep", "0.5", "--method", "global", "--calib_docs", "2", "--out", str(tmp_path / "p"),
                "--hf_out", str(tmp_path / "p_hf")])
    pruned, ckpt = load_model(str(tmp_path / "p.pt"))
    assert pruned.cfg.n_experts == 4 and ckpt["pruning"]["source"] == str(tmp_path / "release")
    idx = torch.randint(0, 320, (1, 10))
    torch.testing.assert_close(load_hf(str(tmp_path / "p_hf"), dtype=torch.float32)(idx)[0], pruned(idx)[0],
                               rtol=2e-2, atol=2e-2)  # the export is bfloat16


def test_a_shard_missing_from_the_folder_is_named(tmp_path):
    export_hf(tiny_model(), str(tmp_path / "sharded"), layers_per_shard=1)
    os.remove(tmp_path / "sharded" / "model-00002-of-00003.safetensors")
    with pytest.raises(UserError, match="names model-00002-of-00003.safetensors, which is not there"):
        load_hf(str(tmp_path / "sharded"))
