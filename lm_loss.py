"""
The language-model loss without the (tokens x vocabulary) logits: LM head + cross-entropy + LM-head z-loss,
a chunk of tokens at a time, forward and backward.

    loss, ce, z, correct = lm_loss(x, weight, targets, z_weight)  # x (N, C), weight (V, C), targets (N,), -1 = ignore
    loss = ce + z_weight * z   (what the model optimises; ce, z and correct are detached, for logs and evaluation)
    ce   = mean over targets != -1 of -log softmax(x @ weight^T)[target]
    z    = mean over targets != -1 of logsumexp(x @ weight^T)^2        (the release's LM-head z-loss)
    correct = how many targets != -1 have the highest logit              (next-token accuracy's count; a tie counts)

Why: with the release's vocabulary (100,352) the float32 logits of 16k tokens take 6.6 GB, and autograd keeps
them (and their softmax) for the backward even when they are made a chunk at a time. Here a custom autograd
Function makes each chunk's logits, turns them at once into the chunk's loss *and* its gradients (the
gradient of the logits is softmax * (1 + 2 z_weight lse) - onehot, over the token count), and lets them go:
only the gradients of x (N, C) and of the head (V, C) are kept for the backward, which scales them by the
incoming gradient. When no gradient is needed (evaluation) only the loss is computed. The head matmuls run in
the autocast dtype when autocast is on (bf16 on GPUs), the softmax and the sums in float32.

lm_loss_reference is the plain computation (all logits at once, autograd), the one the tests compare with.
"""

import torch
import torch.nn.functional as F


def lm_loss_reference(x, weight, targets, z_weight):
    """The plain computation: (loss, ce, z, correct) as lm_loss, holding all (N, V) logits."""
    logits = F.linear(x, weight).float()  # (N, V)
    valid = targets != -1
    n_targets = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / n_targets
    z = (torch.logsumexp(logits, dim=-1).square() * valid).sum() / n_targets
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]  # (N,) logit of each target
    correct = ((picked >= logits.amax(-1)) & valid).sum().float()
    return ce + z_weight * z, ce.detach(), z.detach(), correct


# float32 logits a chunk holds: big GEMMs on a GPU (64 MB); on a CPU a chunk that stays in a core's cache and
# below glibc's mmap threshold (2 MB), whose buffers are then reused (bench/lm_loss.py has the measurements)
LOGITS_PER_CHUNK = {"cpu": 2 ** 19, "cuda": 2 ** 24}


def chunk_rows(vocab_size, device_type):
    """Tokens per chunk: LOGITS_PER_CHUNK of the device's logits, at least 128 tokens (the head's gradient sums
    over a chunk's tokens: it needs enough of them)."""
    return max(128, LOGITS_PER_CHUNK.get(device_type, LOGITS_PER_CHUNK["cuda"]) // vocab_size)


class ChunkedLMLoss(torch.autograd.Function):
    """lm_loss as an autograd Function: loss and gradients chunk by chunk in the forward (see the docstring)."""

    @staticmethod
    def forward(ctx, x, weight, targets, z_weight, rows, needs_grad):
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x_c, w_c = x.to(compute), weight.to(compute)
            n_targets = (targets != -1).sum().clamp(min=1).float()
            ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            z_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            correct = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_x = torch.empty_like(x) if needs_grad else None  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needs_grad else None
            for start in range(0, x.shape[0], rows):
                xs, ts = x_c[start:start + rows], targets[start:start + rows]
                valid = (ts != -1).float()  # (n,)
                logits = F.linear(xs, w_c).float()  # (n, V), the only logits alive
                picked = logits.gather(1, ts.clamp(min=0)[:, None])[:, 0]  # (n,) logit of each target
                top = logits.amax(dim=-1)  # (n,)
                correct += ((picked >= top) * valid).sum()  # a tie counts, as in the reference
                exp = logits.sub_(top[:, None]).exp_()  # (n, V) in place: exp(logits - top)
                sum_exp = exp.sum(dim=-1)  # (n,)
                lse = top + sum_exp.log()  # (n,) logsumexp
                ce_sum += ((lse - picked) * valid).sum()
                z_sum += (lse.square() * valid).sum()
                if needs_grad:
                    # d(ce + z_weight z)/d logits, per valid token: softmax * (1 + 2 z_weight lse) - onehot
                    token_weight = valid / n_targets  # (n,) ignored tokens 0
                    grad_logits = exp.mul_((token_weight * (1 + 2 * z_weight * lse) / sum_exp)[:, None])  # (n, V)
                    grad_logits[torch.arange(len(ts), device=x.device), ts.clamp(min=0)] -= token_weight
                    grad_x[start:start + rows] = (grad_logits.to(compute) @ w_c).to(x.dtype)
                    grad_w += (grad_logits.t().to(compute) @ xs).float()
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ce, z = ce_sum / n_targets, z_sum / n_targets
        ctx.mark_non_differentiable(ce, z, correct)
        return ce + z_weight * z, ce, z, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_z, grad_correct):
        grad_x, grad_w = ctx.saved_tensors  # ce, z and correct are for logs only: their gradients are unused
        return grad_loss * grad_x, grad_loss * grad_w, None, None, None, None


def lm_loss(x, weight, targets, z_weight, rows=None):
    """(loss, ce, z, correct) of the LM head weight (V, C) on x (N, C) against targets (N,), rows tokens at a time
    (default: chunk_rows for x's device)."""
    # (inside Function.forward grad mode is always off and needs_input_grad ignores torch.no_grad(): ask here)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedLMLoss.apply(x, weight, targets, z_weight, rows or chunk_rows(weight.shape[0], x.device.type),
                               needs_grad)
