"""
The expert computation of an MoE layer: every token through its K chosen SwiGLU experts, weighted.

    y[n] = sum_k weights[n, k] * down_e( silu(x[n] @ W_gate_e) * (x[n] @ W_up_e) ),  e = experts[n, k]

Every implementation has one interface:
    moe_mlp(x, w_up_gate, w_down, weights, experts) -> y
    x (N, C) tokens, w_up_gate (E, C, 2H) gate then up projections of each expert, w_down (E, H, C),
    weights (N, K) routing weights, experts (N, K) expert indices; y (N, C) in x's dtype.
The weights are laid out "input x output", so a group of tokens multiplies an expert's weight directly.
Each starts the same way: the N*K (token, slot) pairs are sorted by expert, so that each expert's tokens form
one contiguous group ("sorted slots", NK = N*K rows).

Three paths, equal up to float rounding (tests/test_kernels.py), and one for decoding (moe_mlp_decode, test_decode.py):
- 'loop' (moe_mlp_loop): one matmul pair per expert on its group, in a Python loop. The readable reference;
  it needs the group sizes on the host (a sync) and launches 2E matmuls.
- 'grouped_mm' (moe_mlp_grouped): the same computation as two grouped GEMMs (torch._grouped_mm, group ends
  from a cumsum): no host sync, no loop over experts, on the CPU and on CUDA. It is wrapped in a custom op
  with its backward written out, because torch.compile's shape inference for torch._grouped_mm accepts
  bfloat16 only: wrapped, the layer compiles whole in float32 too.
- 'triton' (triton_moe.py): fused Triton kernels, forward and backward. Imported only when chosen.

expert_path() picks 'grouped_mm' wherever torch._grouped_mm can run, else the loop (which computes the same
thing); NANOEMO_KERNEL=loop|grouped_mm|triton forces one. The choice is made once per (device type, dtype,
widths) and remembered in CHOSEN_PATHS; train.py logs it in its header.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from errors import UserError

PATH_NAMES = ("loop", "grouped_mm", "triton")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm accepts


def swiglu(h):
    """SwiGLU activation: h (..., 2H) gate then up halves -> (..., H)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def sort_by_expert(experts, n_experts):
    """Group the N*K (token, slot) pairs by expert. experts (N, K) ->
    order (NK,) slot indices grouped by expert (token order kept within a group),
    tokens (NK,) the token of each sorted slot, counts (E,) slots per expert."""
    K = experts.shape[1]
    flat = experts.flatten()  # (NK,) expert of each slot, slot n*K + k
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    return order, order // K, counts


def sum_slots(y_sorted, weights, order):
    """Weight each sorted slot's output (NK, C), put the slots back in (token, slot) order and sum each
    token's K slots in float32: (N, C). (A gather and a sum, not an index_add: autograd then keeps only the
    compute-dtype outputs for the routing weights' gradient, not float32 copies.)"""
    weighted = y_sorted * weights.flatten()[order, None].to(y_sorted.dtype)  # (NK, C)
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(len(order), device=order.device)  # sorted row of each (token, slot)
    return weighted[slot_rows].view(*weights.shape, y_sorted.shape[1]).sum(1, dtype=torch.float32)  # (N, C)


def moe_mlp_loop(x, w_up_gate, w_down, weights, experts):
    """The reference: each expert's tokens through its two matmuls, one expert at a time."""
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    groups = x[tokens].split(counts.tolist())  # host sync: the group sizes; empty groups are fine
    # unbind, not w[e]: indexing would make the backward fill a zero (E, C, 2H) gradient per expert
    y_sorted = torch.cat([swiglu(x_e @ w1) @ w2 for x_e, w1, w2 in zip(groups, w_up_gate.unbind(0),
                                                                        w_down.unbind(0))])  # (NK, C)
    return sum_slots(y_sorted, weights, order).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The grouped-GEMM path. grouped_mm multiplies rows (R, I) grouped by expert with weights (E, I, O).

@torch.library.custom_op("nanoemo::grouped_mm", mutates_args=())
def grouped_mm(rows: Tensor, weights: Tensor, group_ends: Tensor) -> Tensor:
    """rows (R, I) grouped by expert, weights (E, I, O), group_ends (E,) int32 -> (R, O): each group of rows
    times its expert's weight."""
    return torch._grouped_mm(rows, weights, offs=group_ends)


@torch.library.custom_op("nanoemo::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: Tensor, grad: Tensor, group_ends: Tensor) -> Tensor:
    """The weight gradient of grouped_mm: rows (R, I), grad (R, O) -> (E, I, O), each expert's rows^T @ grad
    (zeros for an expert without rows)."""
    return torch._grouped_mm(rows.t(), grad, offs=group_ends)


@grouped_mm.register_fake
def _grouped_mm_shape(rows, weights, group_ends):
    return rows.new_empty(rows.shape[0], weights.shape[2])


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_shape(rows, grad, group_ends):
    return rows.new_empty(group_ends.shape[0], rows.shape[1], grad.shape[1])


def _grouped_mm_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    rows, weights, group_ends = ctx.saved_tensors
    return grouped_mm(grad, weights.transpose(1, 2), group_ends), grouped_mm_weight_grad(rows, grad, group_ends), None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_save)


def autocast_inputs(x, w_up_gate, w_down):
    """Cast the operands as autocast would: it cannot see into torch._grouped_mm or a custom Function."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, w_up_gate, w_down
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), w_up_gate.to(dtype), w_down.to(dtype)


def grouped_mm_can_run(dtype, widths):
    """torch._grouped_mm exists from torch 2.8, takes float32, bfloat16 and float16 (not float64), and
    needs rows of a multiple of 16 bytes: widths are the expert hidden size H and the model width C."""
    return (hasattr(torch, "_grouped_mm") and dtype in GROUPED_MM_DTYPES
            and all(w * dtype.itemsize % 16 == 0 for w in widths))


def moe_mlp_grouped(x, w_up_gate, w_down, weights, experts):
    """The loop's computation as two grouped GEMMs over the sorted slots; the same results."""
    x, w_up_gate, w_down = autocast_inputs(x, w_up_gate, w_down)
    if not grouped_mm_can_run(x.dtype, w_down.shape[1:]):
        raise UserError(f"torch._grouped_mm cannot run here (torch {torch.__version__}, {x.dtype}, expert "
                        f"hidden x width {tuple(w_down.shape[1:])}): use NANOEMO_KERNEL=loop")
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    group_ends = counts.cumsum(0).to(torch.int32)  # (E,) where each expert's rows end
    act = swiglu(grouped_mm(x[tokens], w_up_gate, group_ends))  # (NK, H)
    y_sorted = grouped_mm(act, w_down, group_ends)  # (NK, C)
    return sum_slots(y_sorted, weights, order).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Decoding: a few tokens, no gradient. What bounds it is reading the weights once per token; with them laid out
# output x input (model.EMO.for_decoding) every product reads its rows in order. Between two products the weights
# just read have pushed the interpreter's and torch's own data out of cache, so each operation there costs
# microseconds: the fewer, the nearer the bound.

DECODE_SLOTS = 16  # (token, slot) pairs up to which moe_mlp_decode runs for a model laid out for decoding


def moe_mlp_decode(x, w_up_gate, w_down, weights, experts):
    """The loop's computation for a few tokens, token by token: each chosen expert's up-projection (torch.mv on
    the stored (out, in) matrix), SwiGLU on all of them at once, each down-projection, then their weighted sum
    in float32. Every operation is on all K slots at once where it can be."""
    ups, downs = w_up_gate.transpose(1, 2).unbind(0), w_down.transpose(1, 2).unbind(0)  # E x (2H, C), E x (C, H)
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (N, C)
    for n, (x_n, weights_n, chosen) in enumerate(zip(x, weights, experts.tolist())):  # one host sync
        act = swiglu(torch.stack([torch.mv(ups[e], x_n) for e in chosen]))  # (K, H)
        slot_outputs = torch.stack([torch.mv(downs[e], a) for e, a in zip(chosen, act)])  # (K, C)
        y[n] = weights_n @ slot_outputs.float()  # float32 accumulation
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Which path runs.

def moe_mlp_triton(x, w_up_gate, w_down, weights, experts):
    """The fused Triton kernels (triton_moe.py), imported on first use: no other path needs Triton."""
    from triton_moe import TritonMoE
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    return TritonMoE.apply(*autocast_inputs(x, w_up_gate, w_down), weights, experts, order, tokens, counts)


PATHS = {"loop": moe_mlp_loop, "grouped_mm": moe_mlp_grouped, "triton": moe_mlp_triton}


CHOSEN_PATHS = {}  # (device type, dtype, widths) -> (path name, why): what expert_path decided


def expert_path(device_type, dtype, widths):
    """(path name, why) for tensors of this device type and compute dtype, widths = (H, C); decided on the
    first call, remembered after (a changed NANOEMO_KERNEL takes effect after CHOSEN_PATHS.clear())."""
    key = (device_type, dtype, widths)
    if key not in CHOSEN_PATHS:
        CHOSEN_PATHS[key] = choose_path(*key)
    return CHOSEN_PATHS[key]


def choose_path(device_type, dtype, widths):
    """What expert_path decides: NANOEMO_KERNEL's path if set, else grouped_mm where it can run, else the loop."""
    forced = os.environ.get("NANOEMO_KERNEL", "auto")
    if forced not in ("auto", *PATH_NAMES):
        raise UserError(f"NANOEMO_KERNEL must be auto, {', '.join(PATH_NAMES)}; got {forced!r}")
    if forced != "auto":
        return forced, "forced by NANOEMO_KERNEL"
    if grouped_mm_can_run(dtype, widths):
        return "grouped_mm", f"torch._grouped_mm runs {dtype} on {device_type}"
    return "loop", (f"torch._grouped_mm cannot run {dtype} with expert hidden x width {widths} "
                    f"(torch {torch.__version__})")


def moe_mlp(x, w_up_gate, w_down, weights, experts, decoding=False):
    """The expert computation by the path expert_path() picks for x's device and compute dtype; for a model laid
    out for decoding (decoding), a few tokens without gradient take moe_mlp_decode."""
    if decoding and weights.numel() <= DECODE_SLOTS and not torch.is_grad_enabled():
        return moe_mlp_decode(x, w_up_gate, w_down, weights, experts)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    path, _ = expert_path(device, dtype, tuple(w_down.shape[1:]))
    return PATHS[path](x, w_up_gate, w_down, weights, experts)
