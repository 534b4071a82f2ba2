"""Streamed pruning (prune_stream.py): the same experts and the same pruned model as prune.py's greedy method
in memory, from a Hugging Face folder and from a nanoEMO checkpoint; the output folder appears only whole.

    python -m pytest tests/test_prune_stream.py -q
"""

import copy
import json
import os

import pytest
import torch

import prune
import prune_stream
from checkpoint import load_model
from errors import UserError
from hf import export_hf, load_hf
from model import EMO, ModelConfig


def tiny_model():
    torch.manual_seed(0)
    return EMO(ModelConfig(vocab_size=64, eos_id=63, seq_len=16, n_layer=3, n_head=2, d_model=16, n_experts=8,
                           top_k=3, expert_hidden=16, doc_attention=True)).eval()


def calibration(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (4, 12), generator=g)
    idx[:, 5] = vocab - 1  # an EOS: two documents per row
    return [(idx, torch.ones_like(idx, dtype=torch.bool))]


def in_memory(model, batches, keep):
    pruned = copy.deepcopy(model)
    return pruned, prune.prune(pruned, batches, keep, "greedy")


@pytest.mark.parametrize("keep", [4, 2])
def test_streamed_from_a_hugging_face_folder_equals_pruning_in_memory(tmp_path, keep):
    model = tiny_model()
    export_hf(model, str(tmp_path / "full"), layers_per_shard=2)
    source = prune_stream.HFLayers(str(tmp_path / "full"))
    os.makedirs(tmp_path / "streamed")
    cfg, layers, weight_map = prune_stream.stream_prune(source, calibration(), keep, str(tmp_path / "streamed"))
    # the folder's model, as it loads (attending causally at inference, as the release)
    reference, reference_layers = in_memory(load_hf(str(tmp_path / "full")), calibration(), keep)
    assert layers == reference_layers and cfg == reference.cfg
    prune_stream.write_metadata(str(tmp_path / "streamed"), cfg, torch.float32, weight_map)
    streamed = load_hf(str(tmp_path / "streamed"))
    idx = calibration(seed=1)[0][0]
    assert torch.equal(streamed(idx), reference(idx))


def test_streamed_from_a_checkpoint_with_the_command_line(tiny_corpus, tiny_checkpoints, tmp_path):
    out = tmp_path / "code_hf"
    prune_stream.main(["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code",
                       "--keep", "0.5", "--calib_docs", "3", "--out", str(out)])
    prune.main(["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code", "--keep", "0.5",
                "--calib_docs", "3", "--out", str(tmp_path / "code")])
    streamed, ckpt = load_model(str(out))
    reference, _ = load_model(str(tmp_path / "code.pt"))
    record = json.loads((out / "pruning.json").read_text())
    assert [k[:-1] for k in record["experts_kept_per_layer"]] == [
        layer["kept"] for layer in json.loads((tmp_path / "code.json").read_text())["layers"]]
    assert ckpt["tokenizer"] is not None and not os.path.exists(str(out) + ".tmp")
    idx = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(streamed(idx), reference(idx), rtol=1e-5, atol=1e-5)


def test_a_failure_half_way_leaves_no_model(tiny_corpus, tiny_checkpoints, tmp_path, monkeypatch):
    written = []

    def full_disk(tensors, path, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        open(path, "wb").write(b"x")

    monkeypatch.setattr(prune_stream, "save_file", full_disk)
    args = ["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--domain", "code", "--keep", "4",
            "--calib_docs", "2", "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match="no space left on the device to write"):
        prune_stream.main(args)
    assert os.listdir(tmp_path) == []
    os.makedirs(tmp_path / "out")
    open(tmp_path / "out" / "notes.txt", "w").write("mine")
    with pytest.raises(UserError, match="exists and is not empty: give another folder, or --replace"):
        prune_stream.main(args)
