"""eval.py: per-domain loss, perplexity and next-token accuracy against a direct computation.

    python -m pytest tests/test_eval.py -q
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
from checkpoint import load_model
from data.corpus import Corpus


def test_evaluation_equals_a_direct_computation(tiny_corpus, tiny_checkpoints):
    corpus = Corpus(tiny_corpus[0])
    model, _ = load_model(tiny_checkpoints["std"])
    results = evaluation.evaluate_domains(model, corpus, "val", 3, 100, torch.device("cpu"))
    for domain, result in results.items():
        tokens = torch.from_numpy(corpus.domain_tokens("val", domain)[:101].astype(np.int64))
        nll, correct = 0.0, 0
        for start in range(0, 100, 32):  # window by window, each token scored once
            x, y = tokens[start:min(start + 32, 100)], tokens[start + 1:min(start + 33, 101)]
            log_probs = F.log_softmax(model(x[None])[0], dim=-1)
            nll -= log_probs.gather(1, y[:, None]).sum().item()
            correct += (log_probs.argmax(-1) == y).sum().item()
        assert result["tokens"] == 100
        assert result["loss"] == pytest.approx(nll / 100, rel=1e-5)
        assert result["accuracy"] == correct / 100
        assert result["perplexity"] == pytest.approx(np.exp(nll / 100), rel=1e-5)
