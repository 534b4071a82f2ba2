"""
Per-domain quality of a model on held-out documents: loss, perplexity and next-token accuracy, routing
token by token (no pool), as the release does at inference.

A domain's validation documents are laid back to back and cut into windows of seq_len + 1 tokens (every
token is predicted once); the last window is padded and its padding ignored.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def domain_windows(tokens, seq_len, max_tokens):
    """(n,) tokens -> inputs and targets (W, T) int64, at most max_tokens targets, padding targets -1."""
    tokens = np.asarray(tokens[:max_tokens + 1], dtype=np.int64)
    n_targets = len(tokens) - 1
    n_windows = math.ceil(n_targets / seq_len)
    x = np.zeros((n_windows, seq_len), dtype=np.int64)
    y = np.full((n_windows, seq_len), -1, dtype=np.int64)
    for w in range(n_windows):
        chunk = tokens[w * seq_len:(w + 1) * seq_len + 1]
        x[w, :len(chunk) - 1] = chunk[:-1]
        y[w, :len(chunk) - 1] = chunk[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def evaluate_windows(model, x, y, batch_size, device, autocast_dtype=torch.float32):
    """Summed loss, correct predictions and scored tokens over windows (W, T), as a tensor of 3.
    Under torch.distributed the windows are shared out and the sums all-reduced; every rank runs the same
    number of forward passes (empty batches where it has none left), as FSDP needs."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n_batches = math.ceil(len(x) / (batch_size * world))
    for b in range(n_batches):
        rows = slice((b * world + rank) * batch_size, (b * world + rank + 1) * batch_size)
        xb, yb = x[rows].to(device), y[rows].to(device)
        if len(xb) == 0:  # nothing left for this rank: a dummy pass with nothing scored
            xb, yb = x[:1].to(device), torch.full_like(x[:1], -1).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            logits, _, _ = model(xb, token_routing=True)
        scored = yb != -1
        loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), ignore_index=-1, reduction="sum")
        correct = ((logits.argmax(-1) == yb) & scored).sum()
        sums += torch.stack([loss.double(), correct.double(), scored.sum().double()])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return sums


def summarize(sums):
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": correct / max(count, 1),
            "tokens": int(count)}


def evaluate_domains(model, corpus, split, seq_len, batch_size, max_tokens, device, autocast_dtype=torch.float32,
                     domains=None):
    """{domain: {loss, perplexity, accuracy, tokens}} on the first max_tokens tokens of each domain's split."""
    results = {}
    for domain in domains or corpus.domains:
        x, y = domain_windows(corpus.domain_tokens(split, domain), seq_len, max_tokens)
        results[domain] = summarize(evaluate_windows(model, x, y, batch_size, device, autocast_dtype))
    return results
