"""Damaged files and bad values: a truncated or foreign checkpoint, safetensors file, config or index, a config that
contradicts itself, bad training values, a shape-changing resume, bad values of the other commands: each a
one-line error with exit status 2, before any work.

    python -m pytest tests/test_bad_input.py -q
"""

import json
import os

import pytest
import torch

import eval as evaluation
import prune_stream
import sample
import train
from errors import UserError
from hf import export_hf, load_hf
from tests.conftest import tiny_run
from tests.test_cli import one_line_error
from tests.test_hf import tiny_model


def test_damaged_checkpoint_files_are_one_line(capsys, tmp_path, tiny_checkpoints):
    export_hf(tiny_model(), str(tmp_path / "x"), layers_per_shard=1)
    folder = tmp_path / "x"
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert one_line_error(capsys, evaluation.main, ["--ckpt", str(folder), "--data", "x"]).startswith(
        f"error: {shard} is not a readable safetensors file (")
    (folder / "model.safetensors.index.json").write_text("{ not json")
    assert one_line_error(capsys, evaluation.main, ["--ckpt", str(folder), "--data", "x"]).startswith(
        f"error: {folder / 'model.safetensors.index.json'} is not valid JSON (")
    (folder / "config.json").write_text("")
    assert one_line_error(capsys, evaluation.main, ["--ckpt", str(folder), "--data", "x"]).startswith(
        f"error: {folder / 'config.json'} is not valid JSON (")
    ckpt = torch.load(os.path.join(tiny_checkpoints["emo"], "ckpt.pt"), weights_only=False)
    ckpt["model_config"]["no_such_field"] = 1
    torch.save(ckpt, tmp_path / "future.pt")
    assert one_line_error(capsys, evaluation.main, ["--ckpt", str(tmp_path / "future.pt"), "--data", "x"]).startswith(
        f"error: {tmp_path / 'future.pt'}: its model config does not fit this nanoEMO (")


def test_a_contradicting_expert_count_is_refused(tmp_path):
    export_hf(tiny_model(), str(tmp_path / "x"))
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    config.update(num_experts=8, num_experts_per_layer=[4, 6, 4])
    (tmp_path / "x" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="num_experts 8 contradicts num_experts_per_layer \\[4, 6, 4\\]"):
        load_hf(str(tmp_path / "x"))


@pytest.mark.parametrize("extra,message", [
    (["--lr=-1"], "lr must be >= 0 and min_lr_ratio in [0, 1], got -1.0 and 0.1"),
    (["--batch_size=0"], "batch_size must be at least 1, got 0"),
    (["--checkpoint_interval=0"], "checkpoint_interval must be at least 1, got 0"),
    (["--anneal_steps=10"], "warmup_steps + anneal_steps must not exceed max_steps"),
    (["--top_k=0"], "top_k 0 must exceed n_shared 1 and be at most n_experts 8"),
    (["--expert_hidden=0"], "sizes must be at least 1"),
])
def test_bad_training_values_are_one_line_before_any_step(capsys, tiny_corpus, tmp_path, extra, message):
    out = tmp_path / "never"
    assert one_line_error(capsys, train.main, tiny_run(tiny_corpus[0], out, *extra)).startswith(f"error: {message}")
    assert not out.exists()


def test_resume_with_a_shape_changing_override_is_one_line(capsys, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    train.train(tiny_run(tiny_corpus[0], out, "--stop_after=1"))
    line = one_line_error(capsys, train.main, tiny_run(tiny_corpus[0], out, "--init_from=resume", "--expert_hidden=8"))
    assert line.startswith("error: checkpoint of another shape: ")


def test_bad_values_of_the_other_commands_are_one_line(capsys, tiny_corpus, tiny_checkpoints, tmp_path):
    emo, data_dir = tiny_checkpoints["emo"], tiny_corpus[0]
    for bad in (["--max_tokens", "0"], ["--max_tokens", "-5"], ["--batch_size", "0"]):
        assert one_line_error(capsys, evaluation.main, ["--ckpt", emo, "--data_dir", data_dir, *bad]).startswith(
            "error: --max_tokens ")
    assert one_line_error(capsys, sample.main, ["--ckpt", emo, "--temperature", "-1"]) == (
        "error: --temperature -1.0: give 0 (the most likely token) or more")
    assert one_line_error(capsys, sample.main, ["--ckpt", emo, "--top_k", "0"]) == (
        "error: --max_new_tokens, --num_samples and --top_k must be at least 1")
    assert one_line_error(capsys, prune_stream.main, ["--ckpt", emo, "--data_dir", data_dir, "--domain", "code",
                                                      "--keep", "4", "--calib_docs", "0", "--out",
                                                      str(tmp_path / "x")]) == (
        "error: --calib_docs 0: at least one calibration example is needed")
    assert not (tmp_path / "x").exists()
