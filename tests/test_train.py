"""Training-loop tests: exact resume, atomic checkpoints, NaN stop, bad inputs, the learning rate, data windows
(the configurations: test_configs.py; data parallelism: test_parallel.py).

    python -m pytest tests/test_train.py -q
"""

import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
from configurator import ConfigError
from data.corpus import TrainWindows
from errors import UserError
from model import EMO, ModelConfig
from tests.conftest import tiny_run
from train import TrainConfig, learning_rate, train


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
    with pytest.raises(UserError, match="step 3: the loss \\(nan\\) .* not finite; stopped before the update"):
        train(tiny_run(tiny_corpus[0], out, "--init_from=resume"))
    assert open(ckpt_file, "rb").read() == before
    assert "stopped before the update, the last checkpoint kept" in open(out / "log.txt").read()


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


def test_the_final_anneal_reaches_zero_at_the_last_step():
    """anneal_steps: the cosine ends at min_lr_ratio * lr anneal_steps before the end, then the learning rate
    falls linearly to 0 at the last step (step max_steps - 1, the last update)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, anneal_steps=20)
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 80)))
    assert learning_rate(89, cfg) == pytest.approx(0.1, abs=1e-3)  # the cosine's end
    assert [learning_rate(step, cfg) for step in (90, 99, 109)] == pytest.approx([0.1 * 19 / 20, 0.1 * 10 / 20, 0])
    steps = [learning_rate(step, cfg) for step in range(90, 110)]
    assert all(a > b for a, b in zip(steps, steps[1:]))


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
