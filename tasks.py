"""
A multiple-choice task per domain, built offline from held-out documents, to measure what the paper
measures (task accuracy after pruning) where no benchmark is available:

    passage:  64 tokens of a document
    choices:  the 32 tokens that follow it in that document, and 32 tokens from each of 3 other documents of
              the same domain (so every choice is plausible text of the domain; only one continues the passage)

A choice is scored by its log-likelihood given the passage (the sum over its tokens, as benchmark harnesses
score multiple-choice answers; all choices have the same length), and the item is right when the true
continuation scores highest. Chance is 1 in 4.

Items come from a domain's validation documents, one per document long enough (a fixed seed picks where the
passage ends and the distractors). Pruning calibrates on demonstrations built the same way from the
calibration documents, passage plus its true continuation, with the router statistics taken over the
continuation's tokens (the answer), as the release calibrates on demonstrations with their answers; the items
scored are never seen by it.

    items = task_items(corpus.documents("val", "python"), seed=0)
    accuracy = task_accuracy(model, items, batch_size=64, device=torch.device("cpu"))
    demos = demonstrations(corpus.documents("calib", "python"), n=16)    # [(tokens (1, T), answer mask (1, T))]
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PASSAGE, ANSWER, CHOICES = 64, 32, 4


@dataclass
class Item:
    passage: np.ndarray  # (PASSAGE,) tokens
    choices: list  # CHOICES arrays of (ANSWER,) tokens
    answer: int  # index of the true continuation among the choices


def spans_of(document):
    """How many PASSAGE + ANSWER spans fit in a document without its final EOS."""
    return len(document) - 1 - (PASSAGE + ANSWER) + 1


def task_items(documents, seed=0):
    """One item per document long enough, in document order. documents: token arrays ending with EOS."""
    rng = np.random.default_rng(seed)
    eligible = [i for i, doc in enumerate(documents) if spans_of(doc) > 0]
    items = []
    for i in eligible:
        cut = PASSAGE + int(rng.integers(spans_of(documents[i])))  # where the passage ends
        truth = documents[i][cut:cut + ANSWER]
        others = rng.choice([j for j in range(len(documents)) if j != i and len(documents[j]) > ANSWER],
                            size=CHOICES - 1, replace=False)
        distractors = []
        for j in others:  # ANSWER tokens at a random place in another document, its EOS excluded
            start = int(rng.integers(len(documents[j]) - ANSWER))
            distractors.append(documents[j][start:start + ANSWER])
        answer = int(rng.integers(CHOICES))
        choices = distractors[:answer] + [truth] + distractors[answer:]
        items.append(Item(np.asarray(documents[i][cut - PASSAGE:cut]), [np.asarray(c) for c in choices], answer))
    return items


def demonstrations(documents, n, seed=1):
    """n calibration demonstrations: (tokens (1, PASSAGE + ANSWER), answer mask (1, PASSAGE + ANSWER)), cycling
    through the documents long enough (another passage of a document each time round)."""
    rng = np.random.default_rng(seed)
    eligible = [doc for doc in documents if spans_of(doc) > 0]
    if not eligible:
        return []
    demos = []
    for k in range(n):
        doc = eligible[k % len(eligible)]
        cut = PASSAGE + int(rng.integers(spans_of(doc)))
        tokens = torch.from_numpy(np.asarray(doc[cut - PASSAGE:cut + ANSWER], dtype=np.int64))[None]
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, PASSAGE:] = True
        demos.append((tokens, mask))
    return demos


@torch.no_grad()
def choice_log_likelihoods(model, items, batch_size, device):
    """(n_items, CHOICES) summed log-probabilities of each choice's tokens given the passage, token routing."""
    sequences = torch.from_numpy(np.stack([np.concatenate([item.passage, choice]) for item in items
                                           for choice in item.choices]).astype(np.int64))  # (n*CHOICES, P+A)
    was_training = model.training
    model.eval()
    scores = []
    for batch in sequences.split(batch_size):
        batch = batch.to(device)
        logits, _, _ = model(batch[:, :-1], token_routing=True)  # (b, P+A-1, V)
        answer_logits = logits[:, PASSAGE - 1:].float()  # the positions that predict the choice's tokens
        log_probs = F.log_softmax(answer_logits, dim=-1).gather(2, batch[:, PASSAGE:, None])[..., 0]  # (b, A)
        scores.append(log_probs.sum(1).cpu())
    model.train(was_training)
    return torch.cat(scores).view(len(items), CHOICES)


def task_accuracy(model, items, batch_size, device):
    """Fraction of items whose true continuation is the most likely choice."""
    if not items:
        return float("nan")
    predicted = choice_log_likelihoods(model, items, batch_size, device).argmax(1)
    return (predicted == torch.tensor([item.answer for item in items])).float().mean().item()
