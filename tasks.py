"""
A multiple-choice task per domain, built offline from held-out documents, to measure what the paper
measures (task accuracy after pruning) where no benchmark is available:

    passage:  64 tokens of a document
    choices:  the 16 tokens that follow it in that document, and 16 tokens from each of 3 other documents of
              the same domain (so every choice is plausible text of the domain; only one continues the passage)

A choice is scored by how much the passage raises its log-likelihood: log p(choice | passage) -
log p(choice | start of a document), its tokens summed (the mutual-information scoring of benchmark
harnesses, lm-evaluation-harness's acc_mutual_info: it cancels how likely a piece of text is on its own, which
otherwise decides for a small model). The item is right when the true continuation scores highest; chance is
1 in 4. (docs/results.md says why this construction and not plain likelihood.)

Items come from a domain's validation documents, two per document long enough (a fixed seed picks where the
passages end and the distractors). Pruning calibrates on demonstrations built the same way from the
calibration documents, passage plus its true continuation, with the router statistics taken over the
continuation's tokens (the answer), as the release calibrates on demonstrations with their answers; the items
scored are never seen by it.

    items = task_items(corpus.documents("val", "python"), seed=0)
    accuracy = task_accuracy(model, items, batch_size=64, device=torch.device("cpu"))
    tokens, answer_mask = demonstrations(corpus.documents("calib", "python"), n=16)    # (16, T) each
    tokens, every_token = few_shot_examples(corpus.documents("calib", "python"), n=4, shots=2)  # (4, 3 T)

log_likelihoods is the plain definition (each passage and choice one sequence: benchmarks.py's
request_log_likelihoods, the project's one definition of a continuation's score); the scoring uses its fast path,
shared_context_log_likelihoods: the same numbers with each passage run once for its four choices.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import request_log_likelihoods
from errors import UserError
from model import KVCache, eval_mode

PASSAGE, ANSWER, CHOICES, ITEMS_PER_DOCUMENT = 64, 16, 4, 2


@dataclass
class Item:
    passage: np.ndarray  # (PASSAGE,) tokens
    choices: list  # CHOICES arrays of (ANSWER,) tokens
    answer: int  # index of the true continuation among the choices


def spans_of(document):
    """How many PASSAGE + ANSWER spans fit in a document without its final EOS."""
    return len(document) - 1 - (PASSAGE + ANSWER) + 1


def task_items(documents, seed=0):
    """ITEMS_PER_DOCUMENT items per document long enough, in document order. documents: token arrays ending
    with EOS."""
    rng = np.random.default_rng(seed)
    eligible = [i for i, doc in enumerate(documents) if spans_of(doc) > 0 for _ in range(ITEMS_PER_DOCUMENT)]
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


def demonstrations(documents, n, seed=1, shuffle_documents=False):
    """n calibration demonstrations in one batch: tokens (n, PASSAGE + ANSWER) and answer mask (n, PASSAGE +
    ANSWER), cycling through the documents long enough (another passage of a document each time round), in
    their order or, with shuffle_documents, in an order the seed draws too (so that seeds differ in documents,
    not only in passages)."""
    rng = np.random.default_rng(seed)
    eligible = [doc for doc in documents if spans_of(doc) > 0]
    if not eligible:
        raise UserError(f"no document long enough for a demonstration ({PASSAGE + ANSWER + 1} tokens)")
    if shuffle_documents:
        eligible = [eligible[i] for i in rng.permutation(len(eligible))]
    rows = []
    for k in range(n):
        doc = eligible[k % len(eligible)]
        cut = PASSAGE + int(rng.integers(spans_of(doc)))
        rows.append(np.asarray(doc[cut - PASSAGE:cut + ANSWER], dtype=np.int64))
    tokens = torch.from_numpy(np.stack(rows))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, PASSAGE:] = True
    return tokens, mask


def few_shot_examples(documents, n, shots=2, seed=1, shuffle_documents=False, answers_only=False):
    """n calibration examples of the release's kind, in one batch: a few-shot prompt of `shots` demonstrations
    (a passage and its true continuation each) then a passage and its gold continuation, every token of it
    scored (with answers_only, the gold continuation's only, as fine-tuning's loss): tokens and mask (n,
    (shots + 1) * (PASSAGE + ANSWER)). Consecutive demonstrations come from consecutive documents long enough
    (see demonstrations)."""
    tokens, _ = demonstrations(documents, n * (shots + 1), seed, shuffle_documents)
    tokens = tokens.view(n, -1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if answers_only:
        mask[:, :-ANSWER] = False
    return tokens, mask


def continuation_log_probs(model, hidden, continuation):
    """Summed log-probabilities (n,) of continuation (n, A) from the hidden states (n, A, C) that predict it."""
    log_probs = F.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (n, A, V)
    return log_probs.gather(2, continuation[..., None])[..., 0].sum(1).cpu()


def log_likelihoods(model, contexts, continuations, batch_size, device):
    """The definition (benchmarks.request_log_likelihoods): (n * c,) summed log-probabilities of continuations
    (n * c, A) given their contexts (n, L), c continuations per context in order, each context + continuation
    run as one sequence, routing token by token (eval mode)."""
    c = len(continuations) // len(contexts)
    requests = [(contexts[i // c].tolist(), continuation.tolist()) for i, continuation in enumerate(continuations)]
    return request_log_likelihoods(model, requests, batch_size, device)


@torch.no_grad()
def shared_context_log_likelihoods(model, contexts, continuations, batch_size, device):
    """log_likelihoods' numbers with each context computed once for its c continuations: its keys and values
    (a KVCache) are copied for each (c times fewer context tokens run). batch_size: sequences per pass."""
    (n, L), A = contexts.shape, continuations.shape[1]
    c = len(continuations) // n
    per_pass = max(1, batch_size // c)  # contexts per pass
    sums = []
    with eval_mode(model):
        for start in range(0, n, per_pass):
            context = contexts[start:start + per_pass].to(device)  # (b, L)
            continuation = continuations[start * c:(start + per_pass) * c].to(device)  # (b * c, A)
            cache = KVCache(model.cfg, len(context), device, model.embed.weight.dtype, positions=L + A)
            context_hidden, _ = model.hidden_states(context, cache=cache)  # (b, L, C)
            cache.repeat_interleave(c)
            continuation_hidden, _ = model.hidden_states(continuation[:, :-1], cache=cache)  # (b * c, A - 1, C)
            # the positions predicting the continuation: the context's last, then the continuation's own
            hidden = torch.cat([context_hidden[:, -1:].repeat_interleave(c, dim=0), continuation_hidden], dim=1)
            sums.append(continuation_log_probs(model, hidden, continuation))
    return torch.cat(sums)


def choice_scores(model, items, batch_size, device):
    """(n_items, CHOICES): log p(choice | passage) - log p(choice | start of a document)."""
    choices = torch.from_numpy(np.stack([c for item in items for c in item.choices]).astype(np.int64))  # (n*4, A)
    passages = torch.from_numpy(np.stack([item.passage for item in items]).astype(np.int64))  # (n, PASSAGE)
    document_start = torch.full((len(items), 1), model.cfg.eos_id)  # the EOS that closes the one before
    conditional = shared_context_log_likelihoods(model, passages, choices, batch_size, device)
    unconditional = shared_context_log_likelihoods(model, document_start, choices, batch_size, device)
    return (conditional - unconditional).view(len(items), CHOICES)


def task_accuracy(model, items, batch_size, device):
    """Fraction of items whose true continuation scores highest."""
    if not items:
        return float("nan")
    predicted = choice_scores(model, items, batch_size, device).argmax(1)
    return (predicted == torch.tensor([item.answer for item in items])).float().mean().item()
