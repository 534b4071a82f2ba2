"""The chunked LM loss (lm_loss.py) against the plain computation: loss, cross-entropy, z-loss, correct count and the
gradients of the hidden states and of the head, over many chunks, with ignored targets, in float32 and under
bfloat16 autocast, and without gradients.

    python -m pytest tests/test_lm_loss.py -q
"""

import pytest
import torch

from lm_loss import chunk_rows, lm_loss, lm_loss_reference


def problem(N=700, C=24, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.2] = -1  # ignored positions (padding, prompts)
    return x, weight, targets


@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_plain_computation(z_weight):
    x, weight, targets = problem()
    results = []
    for fn in (lambda *args: lm_loss(*args, rows=128), lm_loss_reference):  # 700 tokens: 6 chunks
        x.grad = weight.grad = None
        loss, ce, z, correct = fn(x, weight, targets, z_weight)
        (3.0 * loss).backward()  # a non-unit incoming gradient
        results.append((loss.detach(), ce, z, correct, x.grad.clone(), weight.grad.clone()))
    for name, a, b in zip(("loss", "ce", "z", "correct", "grad x", "grad head"), *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (results[0][4][targets == -1] == 0).all()  # an ignored token gets no gradient


def test_under_bfloat16_autocast():
    x, weight, targets = problem(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ce, _, _ = lm_loss(x, weight, targets, 1e-2, rows=128)
        reference, ce_reference, _, _ = lm_loss_reference(x, weight, targets, 1e-2)
    loss.backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ce, ce_reference.float(), rtol=2e-2, atol=2e-2)


def test_without_gradients_only_the_loss_is_computed():
    x, weight, targets = problem(seed=2)
    with torch.no_grad():
        loss, ce, z, correct = lm_loss(x, weight, targets, 1e-2)
    reference = lm_loss_reference(x, weight, targets, 1e-2)
    torch.testing.assert_close(torch.stack([loss, ce, z, correct]), torch.stack(reference).detach(), rtol=1e-5,
                               atol=1e-6)
    assert 0 < correct < (targets != -1).sum() and correct == correct.round()
    assert not loss.requires_grad


def test_chunks_hold_about_16m_logits_on_a_gpu_and_512k_on_a_cpu():
    assert chunk_rows(100352, "cuda") == 167 and chunk_rows(4096, "cuda") == 4096 and chunk_rows(10 ** 6, "cuda") == 128
    assert chunk_rows(4096, "cpu") == 128 and chunk_rows(100352, "cpu") == 128 and chunk_rows(256, "cpu") == 2048


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    x, weight, targets = problem(N=50, seed=3)
    loss, _, _, _ = lm_loss(x, weight, torch.full_like(targets, -1), 1e-2)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and (weight.grad == 0).all()
