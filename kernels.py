"""
The expert computation of an MoE layer: every token through its K chosen SwiGLU experts, weighted.

    y[n] = sum_k weights[n, k] * down_e( silu(x[n] @ W_gate_e) * (x[n] @ W_up_e) ),  e = experts[n, k]

The interface is the one every implementation shares:
    moe_mlp(x, w_up_gate, w_down, weights, experts) -> y
    x (N, C) tokens, w_up_gate (E, C, 2H) gate then up projections of each expert, w_down (E, H, C),
    weights (N, K) routing weights, experts (N, K) expert indices; y (N, C) in x's dtype.
The weight layout is "input x output" so that a group of tokens multiplies an expert's weight directly.
All implementations start the same way: the N*K (token, slot) pairs are sorted by expert, so that each
expert's tokens form one contiguous group ("sorted slots", NK = N*K rows).

Three paths, equal up to float rounding (tests/test_kernels.py):
- 'loop' (moe_mlp_loop): one matmul per expert on its group, in a Python loop. The readable reference;
  it needs the group sizes on the host (a sync) and launches 2E matmuls.
- 'grouped_mm' (moe_mlp_grouped): the same computation as two grouped GEMMs, torch._grouped_mm with
  group offsets from a cumsum: no host sync, no loop over experts. Runs on the CPU and on CUDA (bf16 on
  sm90+ has a CUTLASS kernel; other CUDA dtypes/archs use torch's own fallback). It is wrapped in a custom
  op with its backward written out (three more grouped GEMMs), because torch.compile's shape inference
  for torch._grouped_mm accepts bfloat16 only: so wrapped, the layer compiles whole in float32 too.
  It cannot run in float64, before torch 2.8, or with rows whose size in bytes is not a multiple of 16:
  there the automatic choice is the loop, which computes the same thing.
- 'triton' (moe_mlp_triton): four Triton kernels (forward and backward through an autograd Function) that
    * gather each expert's tokens inside the GEMM from the sorted index (no copy of the routed tokens),
    * fuse the SwiGLU activation into the first GEMM and the routing weight into the second,
    * write each slot's output to its own row and sum the K rows per token, so no atomics: deterministic,
    * handle experts without tokens (their weight gradient is written as zeros), any E, any top-k,
    * compute the gradients of x, both weight tensors and the routing weights,
    * pick their tile sizes with triton.autotune on the first call at each shape.
  Row tiles never straddle two experts: each program finds its expert from the per-expert counts itself.
  Runs on CUDA, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, one tile config).

moe_mlp picks 'grouped_mm' wherever it can run (the CUDA default until a GPU measurement shows the Triton
kernel faster at a config's shape, see README "Kernels"); NANOEMO_KERNEL=loop|grouped_mm|triton forces one.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from errors import UserError

KERNELS = ("loop", "grouped_mm", "triton")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm accepts


def sort_by_expert(experts, n_experts):
    """Group the N*K (token, slot) pairs by expert. experts (N, K) ->
    order (N*K,) slot indices grouped by expert (token order kept within a group),
    tokens (N*K,) the token of each sorted slot, counts (E,) slots per expert."""
    K = experts.shape[1]
    flat = experts.flatten()  # (N*K,) expert of each slot, slot n*K + k
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    return order, order // K, counts


def swiglu(h):
    """SwiGLU activation: h (..., 2H) gate then up halves -> (..., H)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def autocast_inputs(x, w_up_gate, w_down):
    """Cast the operands as autocast would: it cannot see into torch._grouped_mm or a custom Function."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, w_up_gate, w_down
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), w_up_gate.to(dtype), w_down.to(dtype)


def experts_by_loop(x_sorted, counts, w_up_gate, w_down):
    """Expert outputs of the sorted slots, one matmul pair per expert: (NK, C) -> (NK, C)."""
    groups = x_sorted.split(counts.tolist())  # host sync: the group sizes; empty groups are fine
    # unbind, not w[e]: indexing would make backward fill a zero (E, C, 2H) gradient per expert
    return torch.cat([swiglu(x_e @ w1) @ w2 for x_e, w1, w2 in zip(groups, w_up_gate.unbind(0), w_down.unbind(0))])


@torch.library.custom_op("nanoemo::grouped_mm", mutates_args=())
def grouped_mm(rows: Tensor, weights: Tensor, group_ends: Tensor) -> Tensor:
    """rows (M, K) grouped by expert, weights (E, K, N), group_ends (E,) int32 -> (M, N): each group of rows
    times its expert's weight."""
    return torch._grouped_mm(rows, weights, offs=group_ends)


@torch.library.custom_op("nanoemo::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: Tensor, grad: Tensor, group_ends: Tensor) -> Tensor:
    """The weight gradient of grouped_mm: rows (M, K), grad (M, N) -> (E, K, N), each expert's rows^T @ grad
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


def experts_by_grouped_mm(x_sorted, counts, w_up_gate, w_down):
    """Expert outputs of the sorted slots as two grouped GEMMs: (NK, C) -> (NK, C), no host sync."""
    group_ends = counts.cumsum(0).to(torch.int32)  # (E,) where each expert's rows end
    act = swiglu(grouped_mm(x_sorted, w_up_gate, group_ends))  # (NK, H)
    return grouped_mm(act, w_down, group_ends)  # (NK, C)


def moe_mlp_sorted(x, w_up_gate, w_down, weights, experts, expert_outputs):
    """Gather a copy of each routed token grouped by expert, run expert_outputs on the groups, weight the
    outputs, put them back in (token, slot) order and sum each token's K slots in float32. (A gather and a
    sum, not an index_add: autograd then keeps only the compute-dtype outputs for the routing weights'
    gradient, not float32 copies.)"""
    (N, C), K = x.shape, experts.shape[1]
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    y_sorted = expert_outputs(x[tokens], counts, w_up_gate, w_down)  # (NK, C) grouped by expert
    weighted = y_sorted * weights.flatten()[order, None].to(y_sorted.dtype)  # (NK, C)
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(len(order), device=order.device)  # sorted row of each (token, slot)
    return weighted[slot_rows].view(N, K, C).sum(1, dtype=torch.float32).to(x.dtype)  # (N, C)


def moe_mlp_loop(x, w_up_gate, w_down, weights, experts):
    """The reference path: one matmul per expert on its sorted tokens (see the file docstring)."""
    return moe_mlp_sorted(x, w_up_gate, w_down, weights, experts, experts_by_loop)


def moe_mlp_grouped(x, w_up_gate, w_down, weights, experts):
    """The grouped-GEMM path (see the file docstring); the same interface and results as moe_mlp_loop."""
    x, w_up_gate, w_down = autocast_inputs(x, w_up_gate, w_down)
    if not grouped_mm_can_run(x.dtype, w_down.shape[1:]):
        raise UserError(f"torch._grouped_mm cannot run here (torch {torch.__version__}, {x.dtype}, expert "
                        f"hidden x width {tuple(w_down.shape[1:])}): use NANOEMO_KERNEL=loop")
    return moe_mlp_sorted(x, w_up_gate, w_down, weights, experts, experts_by_grouped_mm)


def grouped_mm_can_run(dtype, widths):
    """torch._grouped_mm exists from torch 2.8, takes float32, bfloat16 and float16 (not float64), and
    needs rows of a multiple of 16 bytes: widths are the expert hidden size H and the model width C."""
    return (hasattr(torch, "_grouped_mm") and dtype in GROUPED_MM_DTYPES
            and all(w * dtype.itemsize % 16 == 0 for w in widths))


# ---------------------------------------------------------------------------------------------------------
# Triton path. Shapes: NK sorted slots, C model width, H expert hidden, E experts; "rows" are sorted slots.

def tile_configs(block_n=None):
    """The tile sizes autotune tries on a GPU (one config under the interpreter, which cannot time them).
    block_n pins BLOCK_N for a kernel whose output layout depends on it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": block_n or 64, "BLOCK_K": 32})]
    shapes = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
              (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]
    configs = {(m, block_n or n, k, w, s) for m, n, k, w, s in shapes}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in sorted(configs)]


@triton.jit
def _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """This program's row tile: its expert and the sorted-slot rows, found from the per-expert row counts
    (each expert's rows cut into tiles of BLOCK_M, tiles numbered expert after expert; programs past the
    last tile get expert >= E and no rows)."""
    tile = tl.program_id(0)
    es = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + es, mask=es < E, other=0)  # (E_POW2,) rows per expert
    ends = tl.load(group_end_ptr + es, mask=es < E, other=0)  # (E_POW2,) first row past each expert
    tiles = (counts + BLOCK_M - 1) // BLOCK_M  # (E_POW2,) tiles per expert
    tiles_end = tl.cumsum(tiles, 0)  # (E_POW2,) first tile past each expert
    expert = tl.sum((tiles_end <= tile).to(tl.int32))  # experts wholly before this tile
    this = es == expert  # one-hot of this tile's expert (all False for a spare tile)
    first_tile = tl.sum(tl.where(this, tiles_end - tiles, 0))
    end = tl.sum(tl.where(this, ends, 0))
    rows = end - tl.sum(tl.where(this, counts, 0)) + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, rows, rows < end, expert < E


@triton.jit
def _tile_matmul(a_ptr, a_rows, row_mask, w_ptr, expert, cols, col_mask, K_DIM, stride_we, stride_wk, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of a[a_rows] @ w[expert][:, cols]: a (*, K_DIM) row-major, read at the
    given rows (the gather happens in the loads), w[expert] (K_DIM, *) through strides (views welcome)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K_DIM
        a = tl.load(a_ptr + a_rows[:, None] * K_DIM + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(a, w)
    return acc


@triton.autotune(configs=tile_configs(), key=["C", "H"])
@triton.jit
def _up_gate_swiglu_kernel(x_ptr, w_ptr, tokens_ptr, pre_ptr, act_ptr, counts_ptr, group_end_ptr, E, C, H,
                           stride_we, stride_wc, stride_wh, E_POW2: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """pre[r] = x[tokens[r]] @ w[e] (gate and up halves, 2H), act[r] = silu(gate) * up, for a (BLOCK_M rows,
    BLOCK_N hidden columns) tile; the gather of x happens in the loads, each loaded x tile feeds both halves."""
    expert, rows, row_mask, real = _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M, E_POW2)
    if real:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < H
        token = tl.load(tokens_ptr + rows, mask=row_mask, other=0)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < C
            a = tl.load(x_ptr + token[:, None] * C + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            w = w_ptr + expert * stride_we + ks[:, None] * stride_wc + cols[None, :] * stride_wh
            w_mask = k_mask[:, None] & col_mask[None, :]
            gate += tl.dot(a, tl.load(w, mask=w_mask, other=0.0))
            up += tl.dot(a, tl.load(w + H * stride_wh, mask=w_mask, other=0.0))
        act = gate * tl.sigmoid(gate) * up
        mask = row_mask[:, None] & col_mask[None, :]
        out = rows[:, None] * (2 * H) + cols[None, :]
        tl.store(pre_ptr + out, gate.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(pre_ptr + out + H, up.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(act_ptr + rows[:, None] * H + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=tile_configs(), key=["K_DIM", "N_DIM"])
@triton.jit
def _grouped_matmul_scatter_kernel(a_ptr, w_ptr, scale_ptr, out_rows_ptr, out_ptr, counts_ptr, group_end_ptr, E,
                                   K_DIM, N_DIM, stride_we, stride_wk, stride_wn, SCALE: tl.constexpr,
                                   E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """out[out_rows[r]] = scale[r] * a[r] @ w[e]: a (NK, K_DIM) sorted rows, w[e] (K_DIM, N_DIM) through
    strides (a transposed view works), out (NK, N_DIM) in slot order, one row per (token, slot)."""
    expert, rows, row_mask, real = _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M, E_POW2)
    if real:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N_DIM
        acc = _tile_matmul(a_ptr, rows, row_mask, w_ptr, expert, cols, col_mask, K_DIM, stride_we, stride_wk,
                           stride_wn, BLOCK_M, BLOCK_N, BLOCK_K)
        if SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        dest = tl.load(out_rows_ptr + rows, mask=row_mask, other=0)
        tl.store(out_ptr + dest[:, None] * N_DIM + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


SCALE_GRAD_BLOCK_N = 64  # fixed: the routing-weight gradient keeps one partial sum per column tile


@triton.autotune(configs=tile_configs(block_n=SCALE_GRAD_BLOCK_N), key=["C", "H"])
@triton.jit
def _down_swiglu_backward_kernel(dy_ptr, w_ptr, tokens_ptr, pre_ptr, scale_ptr, d_pre_ptr, d_scale_ptr, counts_ptr,
                                 group_end_ptr, E, C, H, stride_we, stride_wh, stride_wc, E_POW2: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Back through the routing weight, the down projection and SwiGLU, for a (rows, hidden columns) tile:
    g = dy[tokens[r]] @ w_down[e]^T; d_scale partial = sum(g * act) over the tile's columns;
    d_act = scale * g; d_pre = (d_act * up * silu'(gate), d_act * silu(gate))."""
    expert, rows, row_mask, real = _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M, E_POW2)
    if real:
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < H
        token = tl.load(tokens_ptr + rows, mask=row_mask, other=0)
        g = _tile_matmul(dy_ptr, token, row_mask, w_ptr, expert, cols, col_mask, C, stride_we, stride_wc,
                         stride_wh, BLOCK_M, BLOCK_N, BLOCK_K)  # w_down[e]^T read as a (C, H) matrix
        mask = row_mask[:, None] & col_mask[None, :]
        pre = pre_ptr + rows[:, None] * (2 * H) + cols[None, :]
        gate = tl.load(pre, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(pre + H, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(d_scale_ptr + rows * tl.num_programs(1) + pid_n, tl.sum(g * silu * up, axis=1), mask=row_mask)
        d_act = g * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        d_gate = d_act * up * sig * (1 + gate * (1 - sig))
        d_pre = d_pre_ptr + rows[:, None] * (2 * H) + cols[None, :]
        tl.store(d_pre, d_gate.to(d_pre_ptr.dtype.element_ty), mask=mask)
        tl.store(d_pre + H, (d_act * silu).to(d_pre_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=tile_configs(), key=["M_DIM", "N_DIM"])
@triton.jit
def _grouped_weight_grad_kernel(a_ptr, b_ptr, a_rows_ptr, b_rows_ptr, scale_ptr, dw_ptr, counts_ptr, group_end_ptr,
                                M_DIM, N_DIM, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[e] = a[rows of e]^T @ (scale * b[rows of e]): (M_DIM, N_DIM) for one expert and one output tile.
    a rows are x[tokens[r]] (GATHER_A) or sorted rows, likewise b. Every program owns its output tile, so no
    atomics; an expert with no rows gets zeros."""
    expert = tl.program_id(0)
    n_tiles_n = tl.cdiv(N_DIM, BLOCK_N)
    ms = (tl.program_id(1) // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(1) % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = ms < M_DIM, ns < N_DIM
    end = tl.load(group_end_ptr + expert)
    start = end - tl.load(counts_ptr + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_mask = rs < end
        a_rows = rs
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + rs, mask=r_mask, other=0)
        b_rows = rs
        if GATHER_B:
            b_rows = tl.load(b_rows_ptr + rs, mask=r_mask, other=0)
        a = tl.load(a_ptr + a_rows[:, None] * M_DIM + ms[None, :], mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * N_DIM + ns[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if SCALE:
            b = (b.to(tl.float32) * tl.load(scale_ptr + rs, mask=r_mask, other=0.0)[:, None]).to(a.dtype)
        acc += tl.dot(tl.trans(a), b)
    tl.store(dw_ptr + expert * M_DIM * N_DIM + ms[:, None] * N_DIM + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def row_tiles_grid(NK, E, n_cols):
    """Grid of the row-tile kernels for any tile config: an upper bound on the row tiles (each expert may
    leave one partial tile) by the column tiles."""
    return lambda meta: (triton.cdiv(NK, meta["BLOCK_M"]) + E, triton.cdiv(n_cols, meta["BLOCK_N"]))


def weight_grid(E, M_DIM, N_DIM):
    return lambda meta: (E, triton.cdiv(M_DIM, meta["BLOCK_M"]) * triton.cdiv(N_DIM, meta["BLOCK_N"]))


class TritonMoE(torch.autograd.Function):
    """moe_mlp through the Triton kernels above; the backward is written out, kernel by kernel."""

    @staticmethod
    def forward(ctx, x, w_up_gate, w_down, weights, experts):
        (N, C), (E, _, H2), K = x.shape, w_up_gate.shape, experts.shape[1]
        H, NK, E_POW2 = H2 // 2, N * K, triton.next_power_of_2(E)
        x, w_up_gate, w_down = x.contiguous(), w_up_gate.contiguous(), w_down.contiguous()
        order, tokens, counts = sort_by_expert(experts, E)
        group_end = counts.cumsum(0)
        scale = weights.flatten()[order].float().contiguous()  # (NK,) routing weight of each sorted slot
        pre = x.new_empty(NK, 2 * H)  # gate and up pre-activations, kept for the backward
        act = x.new_empty(NK, H)
        _up_gate_swiglu_kernel[row_tiles_grid(NK, E, H)](x, w_up_gate, tokens, pre, act, counts, group_end, E, C, H,
                                                          *w_up_gate.stride(), E_POW2=E_POW2)
        y_slots = x.new_empty(NK, C)  # one output row per (token, slot), summed below: no atomics
        _grouped_matmul_scatter_kernel[row_tiles_grid(NK, E, C)](act, w_down, scale, order, y_slots, counts, group_end,
                                                                  E, H, C, *w_down.stride(), SCALE=True, E_POW2=E_POW2)
        ctx.save_for_backward(x, w_up_gate, w_down, scale, order, tokens, pre, act, counts, group_end)
        ctx.weights_dtype = weights.dtype
        return y_slots.view(N, K, C).sum(1, dtype=torch.float32).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_up_gate, w_down, scale, order, tokens, pre, act, counts, group_end = ctx.saved_tensors
        (N, C), (E, H, _), NK = x.shape, w_down.shape, pre.shape[0]
        E_POW2 = triton.next_power_of_2(E)
        dy = dy.contiguous().to(x.dtype)
        # through the routing weight, w_down and SwiGLU: d_pre (NK, 2H), routing-weight partial sums
        d_pre = x.new_empty(NK, 2 * H)
        d_scale = torch.empty(NK, triton.cdiv(H, SCALE_GRAD_BLOCK_N), dtype=torch.float32, device=x.device)
        w_down_t = w_down.stride()  # w_down[e]^T (C, H) read through w_down's strides
        _down_swiglu_backward_kernel[row_tiles_grid(NK, E, H)](
            dy, w_down, tokens, pre, scale, d_pre, d_scale, counts, group_end, E, C, H,
            w_down_t[0], w_down_t[1], w_down_t[2], E_POW2=E_POW2)
        # d_x: d_pre @ w_up_gate[e]^T, one row per slot, summed per token
        dx_slots = x.new_empty(NK, C)
        w1 = w_up_gate.stride()  # w_up_gate[e]^T (2H, C): k along 2H (stride 2), n along C (stride 1)
        _grouped_matmul_scatter_kernel[row_tiles_grid(NK, E, C)](
            d_pre, w_up_gate, scale, order, dx_slots, counts, group_end, E, 2 * H, C, w1[0], w1[2], w1[1],
            SCALE=False, E_POW2=E_POW2)
        dx = dx_slots.view(N, -1, C).sum(1, dtype=torch.float32).to(x.dtype)
        # weight gradients, one expert and one output tile per program
        d_w_down = torch.empty_like(w_down)  # act^T @ (scale * dy[tokens])
        _grouped_weight_grad_kernel[weight_grid(E, H, C)](
            act, dy, tokens, tokens, scale, d_w_down, counts, group_end, H, C, GATHER_A=False, GATHER_B=True,
            SCALE=True)
        d_w_up_gate = torch.empty_like(w_up_gate)  # x[tokens]^T @ d_pre
        _grouped_weight_grad_kernel[weight_grid(E, C, 2 * H)](
            x, d_pre, tokens, tokens, scale, d_w_up_gate, counts, group_end, C, 2 * H, GATHER_A=True,
            GATHER_B=False, SCALE=False)
        d_weights = torch.empty(NK, dtype=torch.float32, device=x.device)
        d_weights[order] = d_scale.sum(1)  # back from sorted slots to (token, slot) order
        return dx, d_w_up_gate, d_w_down, d_weights.view(N, -1).to(ctx.weights_dtype), None


def moe_mlp_triton(x, w_up_gate, w_down, weights, experts):
    """Fused Triton expert computation (see the file docstring); the same interface as moe_mlp_loop."""
    return TritonMoE.apply(*autocast_inputs(x, w_up_gate, w_down), weights, experts)


def kernel_choice(device, dtype=torch.float32, widths=(64, 64)):
    """Which path runs the experts for tensors of this device, dtype and widths (H, C), and why."""
    forced = os.environ.get("NANOEMO_KERNEL", "auto")
    if forced not in ("auto", *KERNELS):
        raise UserError(f"NANOEMO_KERNEL must be auto, {', '.join(KERNELS)}; got {forced!r}")
    if forced != "auto":
        return forced, "forced by NANOEMO_KERNEL"
    if grouped_mm_can_run(dtype, widths):
        return "grouped_mm", f"torch._grouped_mm runs {dtype} on {device.type}"
    return "loop", (f"torch._grouped_mm cannot run {dtype} with expert hidden x width {tuple(widths)} "
                    f"(torch {torch.__version__})")


PATHS = {"loop": moe_mlp_loop, "grouped_mm": moe_mlp_grouped, "triton": moe_mlp_triton}


def moe_mlp(x, w_up_gate, w_down, weights, experts):
    """The expert computation by the path kernel_choice() picks for x's device and compute dtype."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return PATHS[kernel_choice(x.device, dtype, w_down.shape[1:])[0]](x, w_up_gate, w_down, weights, experts)
