"""The configurations: the twins differ only where they should, the toy and small ones sit in the release's
regime (experts to top_k, pool range), and the release's config has its parameter counts.

    python -m pytest tests/test_configs.py -q
"""

import dataclasses
import os

import pytest
import torch

from configurator import parse_args
from model import EMO, ModelConfig
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("emo,std", [("emo_tiny", "std_tiny"), ("emo_small", "std_small")])
def test_small_twin_configs_differ_only_in_the_router(emo, std):
    """The experiments' twins: both mask attention within documents (the evaluation packs documents)."""
    (train_a, model_a), _ = parse_args([f"{ROOT}/config/{emo}.py"], TrainConfig, ModelConfig)
    (train_b, model_b), _ = parse_args([f"{ROOT}/config/{std}.py"], TrainConfig, ModelConfig)
    assert model_a.router == "emo" and model_b.router == "std" and model_a.doc_attention
    assert dataclasses.replace(model_b, router="emo") == model_a
    assert dataclasses.replace(train_b, out_dir=train_a.out_dir) == train_a


def test_release_twin_configs_differ_where_the_release_twins_differ():
    """emo_full / stdmoe_full: router and document attention mask (the release's baseline has none)."""
    (train_a, model_a), _ = parse_args([f"{ROOT}/config/emo_full.py"], TrainConfig, ModelConfig)
    (train_b, model_b), _ = parse_args([f"{ROOT}/config/stdmoe_full.py"], TrainConfig, ModelConfig)
    assert (model_a.router, model_a.doc_attention, model_b.router, model_b.doc_attention) == ("emo", True, "std", False)
    assert dataclasses.replace(model_b, router="emo", doc_attention=True) == model_a
    assert dataclasses.replace(train_b, out_dir=train_a.out_dir) == train_a


@pytest.mark.parametrize("config", ["emo_tiny", "emo_small", "emo_full"])
def test_configs_are_in_the_release_regime(config):
    """Experts to top_k as 128 : 8 (so 12.5% of the experts is twice top_k), pools drawn from
    [k_routed + 1, n_experts] like the release's [8, 128]."""
    (_, cfg), _ = parse_args([f"{ROOT}/config/{config}.py"], TrainConfig, ModelConfig)
    assert cfg.n_experts / cfg.top_k == 16 and cfg.n_experts // 8 == 2 * cfg.top_k
    assert cfg.pool_min == cfg.top_k - cfg.n_shared + 1 == cfg.n_experts // 16 and cfg.pool_max == cfg.n_experts


def test_full_config_parameter_counts():
    (_, model_cfg), _ = parse_args([f"{ROOT}/config/emo_full.py"], TrainConfig, ModelConfig)
    with torch.device("meta"):
        model = EMO(model_cfg)
    total, active = model.num_params()
    embeddings = 2 * model_cfg.vocab_size * model_cfg.d_model  # input embedding + LM head
    print(f"emo_full: {total / 1e9:.3f}B total, {active / 1e9:.3f}B active "
          f"({(active - embeddings) / 1e9:.3f}B without embedding and LM head)")
    assert total == pytest.approx(13.57e9, rel=1e-3)
    assert active - embeddings == pytest.approx(1.08e9, rel=1e-2)


def test_micro_twins_differ_only_where_they_should():
    """The regime's family: the standard MoE differs from EMO in the router only; the 1/8-experts model in its
    experts; the dense model has EMO's active FFN (top_k experts of expert_hidden) as one expert."""
    configs = {name: parse_args([f"{ROOT}/config/{name}.py"], TrainConfig, ModelConfig)[0]
               for name in ("emo_micro", "std_micro", "std_micro_e8", "dense_micro")}
    (emo_train, emo), (std_train, std) = configs["emo_micro"], configs["std_micro"]
    assert dataclasses.replace(std, router="emo") == emo and emo.n_experts / emo.top_k == 16
    assert dataclasses.replace(std_train, out_dir=emo_train.out_dir) == emo_train
    e8, dense = configs["std_micro_e8"][1], configs["dense_micro"][1]
    assert dataclasses.replace(e8, n_experts=emo.n_experts, pool_max=emo.pool_max) == std and e8.n_experts == 8
    assert dense.n_experts == 1 and dense.expert_hidden == emo.top_k * emo.expert_hidden


def test_paper_twins_differ_only_where_they_should():
    """The fixed-pool twin differs from emo_tiny in its pool range only (a quarter of the experts); the twin
    without a shared expert routes as many experts per token, its pools from one more than those."""
    configs = {name: parse_args([f"{ROOT}/config/{name}.py"], TrainConfig, ModelConfig)[0][1]
               for name in ("emo_tiny", "emo_tiny_fixed", "emo_tiny_noshared")}
    emo, fixed, noshared = configs.values()
    assert fixed.pool_min == fixed.pool_max == emo.n_experts // 4
    assert dataclasses.replace(fixed, pool_min=emo.pool_min, pool_max=emo.pool_max) == emo
    assert noshared.n_shared == 0 and noshared.top_k == emo.top_k and noshared.pool_min == noshared.top_k + 1
    assert dataclasses.replace(noshared, n_shared=1, pool_min=emo.pool_min) == emo


@pytest.mark.parametrize("config", ["emo_micro", "std_micro", "std_micro_e8", "dense_micro", "emo_tiny_fixed",
                                    "emo_tiny_noshared"])
def test_micro_and_paper_configs_build_and_train_a_step(tiny_corpus, tmp_path, config):
    """Each trains a step on the tests' corpus (its vocabulary and a shorter sequence given on the command line)."""
    from train import train
    _, history = train([f"{ROOT}/config/{config}.py", f"--data_dir={tiny_corpus[0]}", "--vocab_size=320",
                        "--eos_id=319", "--seq_len=32", "--batch_size=2", "--max_steps=1", "--warmup_steps=0",
                        "--eval_tokens=64", f"--out_dir={tmp_path / config}"])
    assert len(history) == 1 and history[0]["loss"] > 0 and "val" in history[0]
