"""Nothing lost, nothing silently wrong: two runs on one folder, a non-finite update at a checkpoint step, an
export over a folder, a new run over an old one, a pruned folder pruned again, a full disk, a stop by signal:
each reproduced, with the behaviour owed (nothing lost, nothing loaded that was not written whole, a one-line
error with exit status 2). Damaged files and bad values: test_bad_input.py.

    python -m pytest tests/test_faults.py -q
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import checkpoint
import files
import prune
import prune_stream
import train
from errors import UserError
from hf import export_hf, load_hf
from tests.conftest import tiny_run
from tests.test_cli import ROOT, one_line_error
from tests.test_hf import tiny_model


def start_training(data_dir, out_dir, *extra):
    """A training process of many steps in the background, once it holds its folder."""
    argv = tiny_run(data_dir, out_dir, "--max_steps=100000", "--checkpoint_interval=2", *extra)
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")) or process.poll() is not None:
            break
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()
    return process


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(capsys, tiny_corpus, tmp_path):
    data_dir, out = tiny_corpus[0], tmp_path / "run"
    first = start_training(data_dir, out)
    try:
        line = one_line_error(capsys, train.main, tiny_run(data_dir, out, "--init_from=resume"))
        assert line == f"error: {out} is in use by another run (process {first.pid}): wait for it to end, or give " \
                       "another out_dir"
    finally:
        first.kill()  # kill -9: the kernel drops the lock with the process
        first.wait()
    _, history = train.train(tiny_run(data_dir, out, "--init_from=resume", "--max_steps=100000",
                                      f"--stop_after={checkpoint.load_checkpoint(str(out))['step'] + 1}"))
    assert len(history) == 1


def test_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """A second writer of the same path while the first is writing: each writes its own temporary file, and
    the file ends whole (the last renamed), with no temporary file left."""
    path = str(tmp_path / "ckpt.pt")

    def first(f):
        f.write(b"first, part one; ")
        files.atomic_write(path, lambda g: g.write(b"second, whole"))
        f.write(b"part two")

    files.atomic_write(path, first)
    assert open(path, "rb").read() == b"first, part one; part two" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_non_finite_update_is_never_saved(tiny_corpus, tmp_path, monkeypatch):
    """The gradient of step 2 turns non-finite on a checkpoint step: the run stops before the update, the
    checkpoint of step 1 stays; and a model with a non-finite weight is never written."""
    out = tmp_path / "run"
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def nan_at_the_second_step(parameters, max_norm):
        calls.append(1)
        norm = clip(parameters, max_norm)
        return torch.full_like(norm, float("nan")) if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_the_second_step)
    with pytest.raises(UserError, match="step 1: the loss .* or the gradient norm \\(nan\\) is not finite"):
        train.train(tiny_run(tiny_corpus[0], out, "--checkpoint_interval=1"))
    saved = checkpoint.load_checkpoint(str(out))
    assert saved["step"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    monkeypatch.undo()
    model, _ = checkpoint.load_model(str(out))
    run = types.SimpleNamespace(raw=model, optimizer=None, device=None, world=1, rank=0, step=1)
    with torch.no_grad():
        model.norm.weight[0] = float("inf")
    monkeypatch.setattr(checkpoint, "full_state", lambda raw, optimizer: (raw.state_dict(), {}))
    monkeypatch.setattr(checkpoint, "all_ranks_rng_states", lambda device, world: [])
    with pytest.raises(UserError, match="1 weights are not finite \\(norm.weight...\\): not saved"):
        checkpoint.save_run(run)


def test_a_large_learning_rate_stops_with_a_finite_checkpoint(capsys, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(capsys, train.main, tiny_run(tiny_corpus[0], out, "--lr=1e4", "--checkpoint_interval=1",
                                                        "--max_steps=40", "--warmup_steps=0"))
    assert "is not finite; stopped before the update, the last checkpoint kept" in line
    saved = checkpoint.load_checkpoint(str(out))
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_new_run_over_an_old_one_is_refused(capsys, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    train.train(tiny_run(tiny_corpus[0], out, "--stop_after=1"))
    before = open(out / "ckpt.pt", "rb").read()
    assert one_line_error(capsys, train.main, tiny_run(tiny_corpus[0], out)) == (
        f"error: {out} already holds a run ({out / 'ckpt.pt'}): continue it with --init_from=resume, or give "
        "another out_dir")
    assert open(out / "ckpt.pt", "rb").read() == before


def test_an_export_over_a_folder_is_refused_or_replaces_it_whole(capsys, tmp_path):
    model = tiny_model()
    export_hf(model, str(tmp_path / "x"), layers_per_shard=1)  # sharded, with an index
    assert (tmp_path / "x" / "model.safetensors.index.json").exists()
    other = tiny_model()
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    with pytest.raises(UserError, match="exists and is not empty: give another folder, or --replace"):
        export_hf(other, str(tmp_path / "x"))
    export_hf(other, str(tmp_path / "x"), replace=True)  # one file: the old index and shards are gone
    assert sorted(os.listdir(tmp_path / "x")) == ["config.json", "model.safetensors"]
    assert torch.equal(load_hf(str(tmp_path / "x")).lm_head.weight, other.lm_head.weight)
    assert sorted(os.listdir(tmp_path)) == ["x"]
    checkpoint.save_checkpoint(str(tmp_path / "m.pt"), {"model_config": vars(model.cfg), "model": model.state_dict()})
    assert one_line_error(capsys, checkpoint.main, ["--ckpt", str(tmp_path / "m.pt"), "--hf_out",
                                                    str(tmp_path / "x")]).startswith(f"error: {tmp_path / 'x'} exists")


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    export_hf(tiny_model(), str(tmp_path / "x"))
    before = {name: open(tmp_path / "x" / name, "rb").read() for name in os.listdir(tmp_path / "x")}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hf.save_file", disk_full)
    with pytest.raises(UserError, match=f"no space left on the device to write {tmp_path / 'x'}"):
        export_hf(tiny_model(), str(tmp_path / "x"), replace=True)
    assert {name: open(tmp_path / "x" / name, "rb").read() for name in os.listdir(tmp_path / "x")} == before
    assert sorted(os.listdir(tmp_path)) == ["x"]


class FillingDisk:
    """A file on a disk that fills up after its first 64 bytes."""

    def __init__(self, *args):
        self.file, self.written = open(*args), 0

    def write(self, data):
        self.written += len(data)
        if self.written > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos': the error names the disk, the old file stays."""
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"model_config": {}, "model": {"w": torch.ones(3)}, "step": 1})
    monkeypatch.setattr(files, "open", FillingDisk, raising=False)
    with pytest.raises(UserError, match=f"no space left on the device to write {path} .*: nothing was replaced"):
        checkpoint.save_checkpoint(path, {"model_config": {}, "model": {"w": torch.zeros(1000)}, "step": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_pruned_folder_pruned_again_keeps_original_ids_or_is_refused(tiny_corpus, tiny_checkpoints, tmp_path):
    data_dir, emo = tiny_corpus[0], tiny_checkpoints["emo"]
    prune_stream.main(["--ckpt", emo, "--data_dir", data_dir, "--domain", "code", "--keep", "4", "--calib_docs", "2",
                       "--out", str(tmp_path / "half")])
    first = json.load(open(tmp_path / "half" / "pruning.json"))["experts_kept_per_layer"]
    with pytest.raises(UserError, match="already pruned for 'code'"):
        prune.main(["--ckpt", str(tmp_path / "half"), "--data_dir", data_dir, "--domain", "math", "--keep", "2",
                    "--out", str(tmp_path / "bad")])
    with pytest.raises(UserError, match="already pruned: stream the original model"):
        prune_stream.main(["--ckpt", str(tmp_path / "half"), "--data_dir", data_dir, "--domain", "code",
                           "--keep", "2", "--out", str(tmp_path / "bad_hf")])
    prune.main(["--ckpt", str(tmp_path / "half"), "--data_dir", data_dir, "--domain", "code", "--keep", "2",
                "--calib_docs", "2", "--out", str(tmp_path / "quarter")])
    record = json.load(open(tmp_path / "quarter.json"))
    assert record["original_n_experts"] == 8 and record["source"] == emo
    for before, after in zip(first, record["layers"]):
        assert len(after["kept"]) == 1 and set(after["kept"]) <= set(before[:-1])  # original ids


def test_a_stop_by_signal_checkpoints_and_exits_non_zero(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    process = start_training(tiny_corpus[0], out)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in open(out / "log.txt").read()
    saved = checkpoint.load_checkpoint(str(out))
    assert saved["step"] == len(json.load(open(out / "history.json")))
