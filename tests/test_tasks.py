"""The multiple-choice task (tasks.py): items made from documents as described, the mutual-information score
against a direct computation, the accuracy, and the calibration demonstrations.

    python -m pytest tests/test_tasks.py -q
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tasks
from errors import UserError
from model import EMO, ModelConfig
from tasks import ANSWER, CHOICES, ITEMS_PER_DOCUMENT, PASSAGE

EOS = 99


def documents(n=6, seed=0):
    """Documents of distinct token ranges (so a span tells which document it came from), each ending in EOS."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([10 * d + rng.integers(0, 10, size=rng.integers(90, 160)), [EOS]]) for d in range(n)] + \
        [np.array([1, 2, EOS])]  # too short for an item


def test_items_pair_a_passage_with_its_continuation_and_other_documents_spans():
    docs = documents()
    items = tasks.task_items(docs, seed=3)
    assert len(items) == 6 * ITEMS_PER_DOCUMENT
    for n, item in enumerate(items):
        source = docs[n // ITEMS_PER_DOCUMENT]
        assert item.passage.shape == (PASSAGE,) and all(c.shape == (ANSWER,) for c in item.choices)
        text = source.tolist()
        cut = next(i for i in range(PASSAGE, len(text)) if text[i - PASSAGE:i] == item.passage.tolist())
        assert item.choices[item.answer].tolist() == text[cut:cut + ANSWER]  # the true continuation
        others = [c for k, c in enumerate(item.choices) if k != item.answer]
        assert len({int(c[0]) // 10 for c in others} | {int(source[0]) // 10}) == CHOICES  # 3 other documents
        assert all(EOS not in c for c in item.choices)
    assert len({item.answer for item in items}) > 1  # the right answer is not always at the same place


def tiny_model(doc_attention=False):
    torch.manual_seed(0)
    return EMO(ModelConfig(vocab_size=100, eos_id=EOS, seq_len=96, n_layer=2, n_head=2, d_model=16, n_experts=4,
                           top_k=2, expert_hidden=8, doc_attention=doc_attention)).eval()


def direct_log_likelihood(model, context, continuation):
    sequence = torch.tensor(np.concatenate([context, continuation]))[None]
    log_probs = F.log_softmax(model(sequence[:, :-1])[0], dim=-1)
    return sum(log_probs[len(context) - 1 + t, int(token)].item() for t, token in enumerate(continuation))


@pytest.mark.parametrize("doc_attention", [False, True])
def test_scores_are_conditional_minus_unconditional_log_likelihoods(doc_attention):
    """Against whole sequences computed one by one: the passage computed once for its 4 choices (a copied KV
    cache) changes nothing, with or without the document mask (the unconditional context is an EOS)."""
    model = tiny_model(doc_attention)
    items = tasks.task_items(documents(), seed=1)[:3]
    scores = tasks.choice_scores(model, items, batch_size=5, device=torch.device("cpu"))
    for item, row in zip(items, scores):
        for choice, score in zip(item.choices, row):
            expected = direct_log_likelihood(model, item.passage, choice) - direct_log_likelihood(model, [EOS], choice)
            assert abs(score.item() - expected) < 1e-4
    right = sum(int(row.argmax()) == item.answer for item, row in zip(items, scores))
    assert tasks.task_accuracy(model, items, 7, torch.device("cpu")) == right / 3


def test_demonstrations_score_the_answer_only():
    tokens, mask = tasks.demonstrations(documents(), n=9)
    assert tokens.shape == mask.shape == (9, PASSAGE + ANSWER)
    assert not mask[:, :PASSAGE].any() and mask[:, PASSAGE:].all()
    with pytest.raises(UserError, match="long enough"):
        tasks.demonstrations([np.array([1, 2, EOS])], n=4)


def test_few_shot_examples_are_demonstrations_in_a_row_every_token_scored():
    tokens, mask = tasks.few_shot_examples(documents(), n=3, shots=2, seed=4)
    demos, _ = tasks.demonstrations(documents(), n=9, seed=4)
    assert tokens.shape == mask.shape == (3, 3 * (PASSAGE + ANSWER)) and mask.all()
    assert torch.equal(tokens, demos.view(3, -1))


@pytest.mark.parametrize("doc_attention", [False, True])
def test_shared_context_scoring_equals_the_definition(doc_attention):
    """Each passage computed once for its choices (a copied KV cache) gives log_likelihoods' numbers."""
    model = tiny_model(doc_attention)
    items = tasks.task_items(documents(), seed=2)[:4]
    passages = torch.from_numpy(np.stack([item.passage for item in items]).astype(np.int64))
    choices = torch.from_numpy(np.stack([c for item in items for c in item.choices]).astype(np.int64))
    device = torch.device("cpu")
    shared = tasks.shared_context_log_likelihoods(model, passages, choices, 6, device)
    torch.testing.assert_close(shared, tasks.log_likelihoods(model, passages, choices, 6, device), rtol=1e-5,
                               atol=1e-4)
