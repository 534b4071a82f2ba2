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
