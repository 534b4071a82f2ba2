"""Shared test fixtures: a tiny four-domain corpus built by data/prepare.py's own code, tiny trained runs, and
calibration batches of its documents.
Without CUDA, Triton kernels run on CPU tensors through Triton's interpreter (set before triton is imported)."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from data.corpus import Corpus
from data.prepare import build_corpus


def tiny_documents(n=24):
    """Four small domains with distinct scripts and symbols, every document unique."""
    rng = random.Random(0)
    words = {
        "english": ["the", "light", "waters", "earth", "said", "and", "was", "good", "heaven"],
        "german": ["Straße", "über", "größer", "Häuser", "schön", "Bücher", "weiß", "und", "für"],
        "code": ["def", "return", "x", "+=", "self.", "(", "):", "\n    ", "None", "import"],
        "math": ["∑", "x_i", "=", "\\frac{1}{2}", "∫", "dx", "π", "≤", "$", "\\alpha"],
    }
    return {domain: [f"{domain} {i}: " + " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120))) + "\n"
                     for i in range(n)] for domain, vocab in words.items()}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(directory, documents, meta) of a corpus with a BPE of 320 tokens (EOS 319)."""
    out = tmp_path_factory.mktemp("corpus")
    docs = tiny_documents()
    meta = build_corpus(docs, str(out), tokenizer="bpe", vocab_size=320, n_val=4, n_calib=3, seed=7)
    return str(out), docs, meta


TINY_MODEL = ["--vocab_size=320", "--eos_id=319", "--seq_len=32", "--n_layer=2", "--n_head=2", "--d_model=32",
              "--n_experts=8", "--n_shared=1", "--top_k=3", "--expert_hidden=16", "--pool_min=2", "--pool_max=7"]


def tiny_run(data_dir, out_dir, *extra):
    """Command-line arguments of a tiny training run: 6 steps of 4 x 32 tokens, checkpoint every 3."""
    return [*TINY_MODEL, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--batch_size=4", "--max_steps=6",
            "--warmup_steps=2", "--eval_interval=3", "--eval_tokens=128", "--log_interval=1",
            "--checkpoint_interval=3", *extra]


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_corpus, tmp_path_factory):
    """{'emo': run directory, 'std': run directory} of two tiny models trained for 6 steps."""
    from train import train
    runs = {}
    for router in ("emo", "std"):
        out = tmp_path_factory.mktemp(f"{router}_run")
        train(tiny_run(tiny_corpus[0], out, f"--router={router}", "--eval_interval=0"))
        runs[router] = str(out)
    return runs


def as_batches(documents, length=32):
    """Calibration batches of plain documents: (idx (1, T), every token scored)."""
    return [(torch.as_tensor(np.asarray(doc[:length], dtype=np.int64))[None], torch.ones(1, len(doc[:length]),
                                                                                          dtype=torch.bool))
            for doc in documents]


def tokens_of(corpus_dir, domain, n=3):
    """Calibration batches of a tiny corpus's first n calibration documents of a domain."""
    return as_batches(Corpus(corpus_dir).documents("calib", domain)[:n])
