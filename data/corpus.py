"""
Reading a corpus written by data/prepare.py, and the random training windows train.py draws from it.

    corpus = Corpus("data/multidomain")            # meta.json + val.bin
    corpus.domain_tokens("val", "python")          # (n,) tokens of that domain's validation documents
    windows = TrainWindows(corpus.train_files(), corpus.dtype, seq_len=256, batch_size=16, seed=1)
    x, y = windows.next_batch()                    # (B, T) int64 inputs and next-token targets

Training tokens may also come from OLMo-style shards (`train_files='/path/part-*.npy'`): flat uint32 token
ids with EOS between documents, either raw (as OLMo writes them, despite the suffix) or with a .npy header.
Document boundaries are the EOS tokens inside each window.
"""

import glob
import json
import os

import numpy as np
import torch

from data.tokenizer import NAMED
from errors import UserError


class Corpus:
    """meta.json and the held-out documents of a corpus directory."""

    def __init__(self, data_dir):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise UserError(f"no corpus at {data_dir!r} (missing meta.json): run `python -m data.prepare`")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.data_dir = data_dir
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size, self.eos_id, self.domains = self.meta["vocab_size"], self.meta["eos_id"], self.meta["domains"]
        self.held_out = open_tokens(os.path.join(data_dir, "val.bin"), self.dtype)

    def train_files(self):
        return [os.path.join(self.data_dir, "train.bin")]

    def documents(self, split, domain):
        """Token arrays (EOS included) of one domain's 'val' or 'calib' documents."""
        if domain not in self.domains:
            raise UserError(f"unknown domain {domain!r}; this corpus has: {', '.join(self.domains)}")
        return [self.held_out[s:e] for s, e, d in self.meta[f"{split}_docs"] if d == domain]

    def domain_tokens(self, split, domain):
        """All of one domain's documents of a split, back to back: (n,) tokens."""
        return np.concatenate(self.documents(split, domain))

    def tokenizer_spec(self):
        """The corpus's tokenizer as load_tokenizer / tokenizer_record take it: a name, or its rank file."""
        name = self.meta["tokenizer"]
        return name if name in NAMED else os.path.join(self.data_dir, self.meta["tokenizer_file"])

    def check_model(self, vocab_size, eos_id):
        """Refuse a model whose vocabulary cannot hold the corpus's tokens or whose EOS differs."""
        if vocab_size < self.vocab_size:
            raise UserError(f"model vocab_size {vocab_size} < corpus vocabulary {self.vocab_size} ({self.data_dir})")
        if eos_id != self.eos_id:
            raise UserError(f"model eos_id {eos_id} != corpus EOS {self.eos_id} ({self.data_dir})")


def open_tokens(path, dtype):
    """Memory-map a flat token file: a .npy with header, or raw tokens of the given dtype."""
    if not os.path.exists(path):
        raise UserError(f"token file not found: {path}")
    with open(path, "rb") as f:
        has_header = f.read(6) == b"\x93NUMPY"
    return np.load(path, mmap_mode="r") if has_header else np.memmap(path, dtype=dtype, mode="r")


def expand_train_files(pattern):
    """Comma-separated paths or globs -> sorted list of files; an error if one matches nothing."""
    files = []
    for part in pattern.split(","):
        matched = sorted(glob.glob(part))
        if not matched:
            raise UserError(f"no training file matches {part!r}")
        files += matched
    return files


class TrainWindows:
    """Random windows of seq_len + 1 tokens from one or more token files.

    The whole global batch (world * batch_size windows) is drawn from one generator that every rank shares,
    and each rank keeps its own slice: the data a run sees is the same for any number of ranks, and the
    generator state alone is the data position a checkpoint needs to resume exactly."""

    def __init__(self, files, dtype, seq_len, batch_size, seed, rank=0, world=1):
        self.arrays = [open_tokens(f, dtype) for f in files]
        starts_per_file = [max(len(a) - seq_len - 1, 0) for a in self.arrays]  # valid window starts
        if sum(starts_per_file) == 0:
            raise UserError(f"training files hold fewer than seq_len + 1 = {seq_len + 1} tokens: {files}")
        self.cumulative = np.cumsum(starts_per_file)
        self.seq_len, self.batch_size, self.rank, self.world = seq_len, batch_size, rank, world
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        """(B, T) inputs and targets, int64 on the CPU."""
        starts = self.rng.integers(0, self.cumulative[-1], size=self.world * self.batch_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        files = np.searchsorted(self.cumulative, mine, side="right")
        offsets = mine - np.concatenate([[0], self.cumulative[:-1]])[files]
        rows = [self.arrays[f][o:o + self.seq_len + 1].astype(np.int64) for f, o in zip(files, offsets)]
        batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state
