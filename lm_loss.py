"""
The language-model loss without the (tokens x vocabulary) logits: LM head + cross-entropy + LM-head z-loss,
a chunk of tokens at a time, forward and backward.

    loss, ce, z = lm_loss(x, weight, targets, z_weight)      # x (N, C), weight (V, C), targets (N,), -1 = ignore
    loss = ce + z_weight * z   (what the model optimises; ce and z are detached, for logging)
    ce   = mean over targets != -1 of -log softmax(x @ weight^T)[target]
    z    = mean over targets != -1 of logsumexp(x @ weight^T)^2        (the release's LM-head z-loss)

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
    """The plain computation: (loss, ce, z) as lm_loss, holding all (N, V) logits."""
    logits = F.linear(x, weight).float()  # (N, V)
    valid = targets != -1
    n_targets = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / n_targets
    z = (torch.logsumexp(logits, dim=-1).square() * valid).sum() / n_targets
    return ce + z_weight * z, ce.detach(), z.detach()


def chunk_rows(vocab_size):
    """Tokens per chunk: about 16M float32 logits (64 MB) at a time, at least 128 tokens."""
    return max(128, 2 ** 24 // vocab_size)


class ChunkedLMLoss(torch.autograd.Function):
    """lm_loss as an autograd Function: loss and gradients chunk by chunk in the forward (see the docstring)."""

    @staticmethod
    def forward(ctx, x, weight, targets, z_weight, rows):
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x_c, w_c = x.to(compute), weight.to(compute)
            needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            n_targets = (targets != -1).sum().clamp(min=1).float()
            ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            z_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_x = torch.empty_like(x) if needs_grad else None  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needs_grad else None
            for start in range(0, x.shape[0], rows):
                xs, ts = x_c[start:start + rows], targets[start:start + rows]
                valid = ts != -1  # (n,)
                logits = F.linear(xs, w_c).float()  # (n, V), the only logits alive
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                picked = logits.gather(1, ts.clamp(min=0)[:, None])[:, 0]  # (n,) logit of each target
                ce_sum += ((lse - picked) * valid).sum()
                z_sum += (lse.square() * valid).sum()
                if needs_grad:
                    # d(ce + z_weight z)/d logits, per valid token: softmax * (1 + 2 z_weight lse) - onehot
                    grad_logits = logits.sub_(lse[:, None]).exp_().mul_((1 + 2 * z_weight * lse)[:, None])
                    grad_logits[torch.arange(len(ts), device=x.device), ts.clamp(min=0)] -= 1
                    grad_logits.mul_((valid / n_targets)[:, None])  # (n, V), ignored tokens 0
                    grad_x[start:start + rows] = (grad_logits.to(compute) @ w_c).to(x.dtype)
                    grad_w += (grad_logits.t().to(compute) @ xs).float()
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ce, z = ce_sum / n_targets, z_sum / n_targets
        ctx.mark_non_differentiable(ce, z)
        return ce + z_weight * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_z):
        grad_x, grad_w = ctx.saved_tensors  # ce and z are returned for logging only: their gradients are unused
        return grad_loss * grad_x, grad_loss * grad_w, None, None, None


def lm_loss(x, weight, targets, z_weight, rows=None):
    """(loss, ce, z) of the LM head weight (V, C) on x (N, C) against targets (N,), rows tokens at a time
    (default: chunk_rows)."""
    return ChunkedLMLoss.apply(x, weight, targets, z_weight, rows or chunk_rows(weight.shape[0]))
