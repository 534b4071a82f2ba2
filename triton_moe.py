"""
The fused Triton kernels of the MoE expert computation (kernels.py's third path, NANOEMO_KERNEL=triton):
forward and backward through an autograd Function, with kernels.moe_mlp_loop's interface and results.

- Each expert's tokens are gathered inside the GEMM from the sorted index (no copy of the routed tokens).
- SwiGLU is fused into the first GEMM and the routing weight into the second.
- Each (token, slot) output is written to its own row and the K rows of a token summed: no atomics, so the
  result is deterministic.
- Experts without tokens are fine (their weight gradient is written as zeros); any E, any top-k.
- The backward computes the gradients of x, both weight tensors and the routing weights.
- Tile sizes are picked by triton.autotune on the first call at each shape. A row tile never straddles two
  experts: each program finds its expert and rows from the per-expert counts itself (_tile_rows).
Runs on CUDA, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, one tile config).

Shapes: NK sorted slots ("rows"), C model width, H expert hidden size, E experts. A weight tile is
(IN_DIM, OUT_DIM); BLOCK_M, BLOCK_N and BLOCK_K are Triton's usual tile sizes along rows, output columns and
the reduction (not the top-k K).
"""

import os

import torch
import triton
import triton.language as tl


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
def _tile_matmul(a_ptr, a_rows, row_mask, w_ptr, expert, cols, col_mask, IN_DIM, stride_we, stride_w_in, stride_w_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of a[a_rows] @ w[expert][:, cols]: a (*, IN_DIM) row-major, read at the
    given rows (the gather happens in the loads), w[expert] (IN_DIM, *) through strides (views welcome)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN_DIM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < IN_DIM
        a = tl.load(a_ptr + a_rows[:, None] * IN_DIM + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_w_in + cols[None, :] * stride_w_out,
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


@triton.autotune(configs=tile_configs(), key=["IN_DIM", "OUT_DIM"])
@triton.jit
def _grouped_matmul_scatter_kernel(a_ptr, w_ptr, scale_ptr, out_rows_ptr, out_ptr, counts_ptr, group_end_ptr, E,
                                   IN_DIM, OUT_DIM, stride_we, stride_w_in, stride_w_out, SCALE: tl.constexpr,
                                   E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """out[out_rows[r]] = scale[r] * a[r] @ w[e]: a (NK, IN_DIM) sorted rows, w[e] (IN_DIM, OUT_DIM) through
    strides (a transposed view works), out (NK, OUT_DIM) in slot order, one row per (token, slot)."""
    expert, rows, row_mask, real = _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M, E_POW2)
    if real:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < OUT_DIM
        acc = _tile_matmul(a_ptr, rows, row_mask, w_ptr, expert, cols, col_mask, IN_DIM, stride_we, stride_w_in,
                           stride_w_out, BLOCK_M, BLOCK_N, BLOCK_K)
        if SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        dest = tl.load(out_rows_ptr + rows, mask=row_mask, other=0)
        tl.store(out_ptr + dest[:, None] * OUT_DIM + cols[None, :], acc.to(out_ptr.dtype.element_ty),
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


@triton.autotune(configs=tile_configs(), key=["IN_DIM", "OUT_DIM"])
@triton.jit
def _grouped_weight_grad_kernel(a_ptr, b_ptr, a_rows_ptr, b_rows_ptr, scale_ptr, dw_ptr, counts_ptr, group_end_ptr,
                                IN_DIM, OUT_DIM, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[e] = a[rows of e]^T @ (scale * b[rows of e]): (IN_DIM, OUT_DIM) for one expert and one output tile.
    a rows are x[tokens[r]] (GATHER_A) or sorted rows, likewise b. Every program owns its output tile, so no
    atomics; an expert with no rows gets zeros."""
    expert = tl.program_id(0)
    n_tiles_n = tl.cdiv(OUT_DIM, BLOCK_N)
    ms = (tl.program_id(1) // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(1) % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = ms < IN_DIM, ns < OUT_DIM
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
        a = tl.load(a_ptr + a_rows[:, None] * IN_DIM + ms[None, :], mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * OUT_DIM + ns[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if SCALE:
            b = (b.to(tl.float32) * tl.load(scale_ptr + rs, mask=r_mask, other=0.0)[:, None]).to(a.dtype)
        acc += tl.dot(tl.trans(a), b)
    tl.store(dw_ptr + expert * IN_DIM * OUT_DIM + ms[:, None] * OUT_DIM + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def row_tiles_grid(NK, E, n_cols):
    """Grid of the row-tile kernels for any tile config: an upper bound on the row tiles (each expert may
    leave one partial tile) by the column tiles."""
    return lambda meta: (triton.cdiv(NK, meta["BLOCK_M"]) + E, triton.cdiv(n_cols, meta["BLOCK_N"]))


def weight_grid(E, IN_DIM, OUT_DIM):
    return lambda meta: (E, triton.cdiv(IN_DIM, meta["BLOCK_M"]) * triton.cdiv(OUT_DIM, meta["BLOCK_N"]))


class TritonMoE(torch.autograd.Function):
    """moe_mlp through the kernels above (kernels.moe_mlp_triton applies it); the backward is written out,
    kernel by kernel."""

    @staticmethod
    def forward(ctx, x, w_up_gate, w_down, weights, experts, order, tokens, counts):
        """The interface of kernels.moe_mlp, and the slots sorted by expert (kernels.sort_by_expert)."""
        (N, C), (E, _, H2), K = x.shape, w_up_gate.shape, experts.shape[1]
        H, NK, E_POW2 = H2 // 2, N * K, triton.next_power_of_2(E)
        x, w_up_gate, w_down = x.contiguous(), w_up_gate.contiguous(), w_down.contiguous()
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
        e_stride, h_stride, c_stride = w_down.stride()  # w_down[e]^T (C, H) is read through them
        _down_swiglu_backward_kernel[row_tiles_grid(NK, E, H)](
            dy, w_down, tokens, pre, scale, d_pre, d_scale, counts, group_end, E, C, H,
            e_stride, h_stride, c_stride, E_POW2=E_POW2)
        # d_x: d_pre @ w_up_gate[e]^T, one row per slot, summed per token
        dx_slots = x.new_empty(NK, C)
        e_stride, c_stride, h_stride = w_up_gate.stride()  # w_up_gate[e]^T (2H, C): in along 2H, out along C
        _grouped_matmul_scatter_kernel[row_tiles_grid(NK, E, C)](
            d_pre, w_up_gate, scale, order, dx_slots, counts, group_end, E, 2 * H, C, e_stride, h_stride, c_stride,
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
        return dx, d_w_up_gate, d_w_down, d_weights.view(N, -1).to(ctx.weights_dtype), None, None, None, None
