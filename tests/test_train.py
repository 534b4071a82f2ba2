"""Training-loop tests: exact resume, atomic checkpoints, NaN stop, bad inputs, configs, data windows,
and 2-process DDP / FSDP2 runs (gloo on CPU) against a single-process run.

    python -m pytest tests/test_train.py -q
"""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import checkpoint
from configurator import ConfigError, parse_args
from data.corpus import TrainWindows
from errors import UserError
from model import EMO, ModelConfig
from tests.conftest import tiny_run
from train import TrainConfig, learning_rate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_reproduces_an_uninterrupted_run(tiny_corpus, tmp_path):
    data_dir = tiny_corpus[0]
    straight, straight_history = train(tiny_run(data_dir, tmp_path / "a"))
    train(tiny_run(data_dir, tmp_path / "b", "--stop_after=3"))
    resumed, resumed_history = train(tiny_run(data_dir, tmp_path / "b", "--init_from=resume"))
    assert [r["step"] for r in resumed_history] == [4, 5, 6]
    assert [r["loss"] for r in straight_history[3:]] == [r["loss"] for r in resumed_history]
    assert torch.equal(flat_params(straight), flat_params(resumed))
    log = open(tmp_path / "b" / "log.txt").read()
    assert "step 00003" in log and "initialised from resume at step 3" in log and "val loss" in log
    history = json.load(open(tmp_path / "b" / "history.json"))  # the whole run, across the resume
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in history] == [r["loss"] for r in straight_history]
    assert "val" in history[2] and "val" in history[5]


def test_killed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"model_config": {}, "model": {"w": torch.ones(3)}, "step": 1})

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt  # the process is killed during the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"model_config": {}, "model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_run(tiny_corpus[0], out, "--stop_after=3"))
    ckpt_file = out / "ckpt.pt"
    ckpt = torch.load(ckpt_file, weights_only=False)
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(ckpt, ckpt_file)
    before = open(ckpt_file, "rb").read()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(tiny_run(tiny_corpus[0], out, "--init_from=resume"))
    assert open(ckpt_file, "rb").read() == before
    assert "stopping without saving" in open(out / "log.txt").read()


@pytest.mark.parametrize("extra,error,message", [
    (["--no_such_key=1"], ConfigError, "no_such_key"),
    (["--max_step=5"], ConfigError, "did you mean 'max_steps'"),
    (["--max_steps=many"], ConfigError, "max_steps must be int"),
    (["--vocab_size=100"], UserError, "eos_id 319 outside the vocabulary 100"),
    (["--vocab_size=100", "--eos_id=5"], UserError, "vocab_size 100 < corpus vocabulary 320"),
    (["--eos_id=5"], UserError, "eos_id 5 != corpus EOS 319"),
    (["--init_from=resume"], UserError, "no .*ckpt.pt"),
    (["--train_files=/no/such/shard-*.npy"], UserError, "no training file matches"),
])
def test_bad_inputs_are_clear_errors_and_write_nothing(tiny_corpus, tmp_path, extra, error, message):
    out = tmp_path / "never"
    with pytest.raises(error, match=message):
        train(tiny_run(tiny_corpus[0], out, *extra))
    assert not out.exists()


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="run `python -m data.prepare`"):
        train(tiny_run(tmp_path / "no_corpus", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_shape_is_refused(tiny_corpus, tmp_path):
    train(tiny_run(tiny_corpus[0], tmp_path / "a", "--stop_after=1"))
    with pytest.raises(UserError, match="checkpoint of another shape: .*w_up_gate"):
        train(tiny_run(tiny_corpus[0], tmp_path / "b", f"--init_from={tmp_path / 'a'}", "--expert_hidden=8"))


def test_fine_tune_from_checkpoint_starts_at_its_weights(tiny_corpus, tmp_path):
    first, _ = train(tiny_run(tiny_corpus[0], tmp_path / "a", "--stop_after=2"))
    second, history = train(tiny_run(tiny_corpus[0], tmp_path / "b", f"--init_from={tmp_path / 'a'}",
                                     "--max_steps=1", "--lr=0"))
    assert history[0]["step"] == 1 and torch.equal(flat_params(first), flat_params(second))


def test_weight_decay_applies_to_everything_but_the_embedding():
    """One AdamW step with zero gradients only decays: p <- p * (1 - lr * wd), except the input embedding
    (the release decays norms, router and LM head too)."""
    from train import configure_optimizer
    torch.manual_seed(0)
    model = EMO(ModelConfig(vocab_size=64, eos_id=0, n_layer=1, d_model=16, n_head=2, n_experts=4, top_k=2,
                            expert_hidden=8))
    cfg = TrainConfig(lr=0.5, weight_decay=0.1)
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] if name == "embed.weight" else before[name] * (1 - 0.5 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1 / 11)
    assert learning_rate(9, cfg) == pytest.approx(10 / 11)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_windows_are_the_same_for_any_number_of_ranks(tmp_path):
    tokens = np.arange(5000, dtype=np.uint32)
    raw, with_header = tmp_path / "raw.npy", tmp_path / "header.npy"
    tokens.tofile(raw)
    np.save(with_header, tokens)
    files = [str(raw), str(with_header)]
    single = TrainWindows(files, np.uint32, seq_len=16, batch_size=6, seed=3)
    ranks = [TrainWindows(files, np.uint32, seq_len=16, batch_size=3, seed=3, rank=r, world=2) for r in (0, 1)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [w.next_batch() for w in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(y[:, :-1], x[:, 1:]) and (y[:, -1] == x[:, -1] + 1).all()  # consecutive tokens
    state = single.state_dict()
    expected = single.next_batch()[0]
    single.load_state_dict(state)
    assert torch.equal(single.next_batch()[0], expected)


CONFIGS = ["emo_tiny", "std_tiny", "emo_small", "std_small", "emo_full", "stdmoe_full"]


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


def run_distributed(result, argv):
    """Launch tests/distributed_worker.py on 2 gloo ranks with train.py's argv; its gathered results."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"{ROOT}/tests/distributed_worker.py", str(result), *argv]
    for attempt in (1, 2):  # gloo's teardown on a loaded 2-core machine has aborted a healthy run: one retry
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return torch.load(result)
        reason = f"2-rank launch exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
        if attempt == 1:
            warnings.warn(f"{reason}; launching again once")
    raise AssertionError(reason + "\n" + done.stdout[-3000:] + done.stderr[-3000:])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_on_the_same_global_batch(tiny_corpus, tmp_path, parallel):
    """2 ranks x 2 sequences == 1 process x 4 sequences from the same weights: the data split and the global
    load-balancing loss (expert counts all-reduced) make the two runs compute the same gradients.
    (Both start from a checkpoint: FSDP initialises its shards with random streams of its own.)"""
    data_dir = tiny_corpus[0]
    train(tiny_run(data_dir, tmp_path / "init", "--router=std", "--stop_after=1"))
    start = f"--init_from={tmp_path / 'init'}"
    result = run_distributed(tmp_path / "result.pt", tiny_run(data_dir, tmp_path / "dist", "--router=std",
                                                               "--batch_size=2", f"--parallel={parallel}", start))
    assert result["ranks_max_diff"] == 0.0  # every rank holds the same parameters
    single, history = train(tiny_run(data_dir, tmp_path / "single", "--router=std", "--batch_size=4", start))
    assert result["losses"] == pytest.approx([r["loss"] for r in history], rel=1e-5)
    assert result["lb"] == pytest.approx([r["lb_loss"] for r in history], rel=1e-5)
    torch.testing.assert_close(result["params"], flat_params(single), rtol=1e-4, atol=1e-5)
    assert os.path.exists(tmp_path / "dist" / "ckpt.pt")


FULL_SHAPED = ["--n_layer=2", "--d_model=32", "--n_head=2", "--expert_hidden=16", "--vocab_size=320", "--eos_id=319",
               "--seq_len=32", "--train_files=", "--max_steps=4", "--warmup_steps=1", "--lr=3e-3", "--log_interval=1",
               "--checkpoint_interval=4", "--eval_interval=0"]


def test_fsdp2_trains_an_emo_full_shaped_model_in_bfloat16(tiny_corpus, tmp_path):
    """config/emo_full.py's model (128 experts, top 8, pools [8, 128], document mask, LM z-loss) and mixed
    precision (FSDP2, bfloat16 compute, float32 master weights and gradient reduction), narrowed to 2 layers
    of width 32, for 4 steps on 2 gloo ranks: the ranks agree, the weights kept are float32, and the losses
    follow a single process computing in bfloat16 autocast on the same batches."""
    data_dir = tiny_corpus[0]
    full = [f"{ROOT}/config/emo_full.py", *FULL_SHAPED, f"--data_dir={data_dir}"]
    train([*full, f"--out_dir={tmp_path / 'init'}", "--parallel=ddp", "--max_steps=1", "--lr=0"])
    start = f"--init_from={tmp_path / 'init'}"
    result = run_distributed(tmp_path / "result.pt", [*full, f"--out_dir={tmp_path / 'fsdp'}", "--batch_size=2", start])
    assert result["ranks_max_diff"] == 0.0
    saved = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in saved["model"].values())  # master weights
    assert saved["model_config"]["n_experts"] == 128 and saved["model_config"]["doc_attention"]
    single, history = train([*full, f"--out_dir={tmp_path / 'single'}", "--parallel=ddp", "--batch_size=4", start])
    assert all(np.isfinite(result["losses"]))
    assert result["losses"] == pytest.approx([r["loss"] for r in history], rel=2e-2)
