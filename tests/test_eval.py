"""eval.py: per-domain loss, perplexity and next-token accuracy against a direct computation; evaluation with
document pools (--pool_eval) against each document run on its own.

    python -m pytest tests/test_eval.py -q
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
from checkpoint import load_model
from data.corpus import Corpus
from errors import UserError
from model import EMO, ModelConfig


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


def test_pool_eval_routes_each_document_within_its_own_pool():
    """With pools in eval mode (--pool_eval), documents packed in one sequence give the logits each gives run on
    its own (attention within documents, RoPE relative): each is routed within the pool of its own tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, eos_id=63, seq_len=40, n_layer=2, n_head=2, d_model=32, n_experts=9, top_k=3,
                      expert_hidden=16, doc_attention=True)
    model = evaluation.set_pool_eval(EMO(cfg).eval(), 3)
    documents = [torch.cat([torch.randint(0, 63, (n,)), torch.tensor([63])]) for n in (7, 12, 9)]
    packed = model(torch.cat(documents)[None])[0]
    alone = torch.cat([model(document[None])[0] for document in documents])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    token_routed = evaluation.set_pool_eval(model, 0)(torch.cat(documents)[None])[0]
    assert not torch.allclose(token_routed, packed, rtol=1e-3, atol=1e-3)  # the pools of 3 of 8 bite
    with pytest.raises(UserError, match="--pool_eval 10: give 0"):
        evaluation.set_pool_eval(model, 10)
