"""
The expert computation of an MoE layer: every token through its K chosen SwiGLU experts, weighted.

    y[n] = sum_k weights[n, k] * down_e( silu(x[n] @ W_gate_e) * (x[n] @ W_up_e) ),  e = experts[n, k]

The interface is the one every implementation shares:
    moe_mlp(x, w_up_gate, w_down, weights, experts) -> y
    x (N, C) tokens, w_up_gate (E, C, 2H) gate then up projections of each expert, w_down (E, H, C),
    weights (N, K) routing weights, experts (N, K) expert indices; y (N, C) in x's dtype.
The weight layout is "input x output" so that a group of tokens multiplies an expert's weight directly.
Both implementations start the same way: the N*K (token, slot) pairs are sorted by expert, so that each
expert's tokens form one contiguous group ("sorted slots", NK = N*K rows).

- moe_mlp_torch: pure torch, any device. Gathers a copy of the routed tokens, one matmul per expert group,
  then a weighted scatter-add back. The readable reference.
- moe_mlp_triton: four Triton kernels (forward and backward through an autograd Function) that
    * gather each expert's tokens inside the GEMM from the sorted index (no copy of the routed tokens),
    * fuse the SwiGLU activation into the first GEMM and the routing weight into the second,
    * write each slot's output to its own row and sum the K rows per token, so no atomics: deterministic,
    * handle experts without tokens (their weight gradient is written as zeros), any E, any top-k,
    * compute the gradients of x, both weight tensors and the routing weights.
  Tiles never straddle two experts: a tile plan made with tensor ops (no host sync) gives each row tile its
  expert and first row. Runs on CUDA, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

moe_mlp picks the Triton path on CUDA and the torch path elsewhere; NANOEMO_KERNEL=torch or =triton forces one.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


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


def moe_mlp_torch(x, w_up_gate, w_down, weights, experts):
    """Pure-torch expert computation, one matmul per expert on its sorted tokens (see the file docstring)."""
    order, tokens, counts = sort_by_expert(experts, w_up_gate.shape[0])
    x_sorted = x[tokens]  # (N*K, C) a copy of each token per chosen expert, grouped by expert
    groups = x_sorted.split(counts.tolist())  # host sync: the group sizes; empty groups are fine
    # unbind, not w[e]: indexing would make backward fill a zero (E, C, 2H) gradient per expert
    experts_w1, experts_w2 = w_up_gate.unbind(0), w_down.unbind(0)
    y_sorted = torch.cat([swiglu(x_e @ w1) @ w2 for x_e, w1, w2 in zip(groups, experts_w1, experts_w2)])  # (N*K, C)
    y_sorted = y_sorted.float() * weights.flatten()[order, None].float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y_sorted)  # (N, C)
    return y.to(x.dtype)



# ---------------------------------------------------------------------------------------------------------
# Triton path. Shapes: NK sorted slots, C model width, H expert hidden, E experts; "rows" are sorted slots.

@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, group_end_ptr, BLOCK_M: tl.constexpr):
    """This program's row tile: its expert, the sorted-slot rows, and which rows lie inside the group."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(group_end_ptr + expert)  # 0 for the spare tiles past the last expert (expert == E)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, start, end, rows, rows < end


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


@triton.jit
def _up_gate_swiglu_kernel(x_ptr, w_ptr, tokens_ptr, pre_ptr, act_ptr, tile_expert_ptr, tile_start_ptr,
                           group_end_ptr, C, H, stride_we, stride_wc, stride_wh,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """pre[r] = x[tokens[r]] @ w[e] (gate and up halves, 2H), act[r] = silu(gate) * up, for a (BLOCK_M rows,
    BLOCK_N hidden columns) tile; the gather of x happens in the loads, each loaded x tile feeds both halves."""
    expert, start, end, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, group_end_ptr, BLOCK_M)
    if start >= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    token = tl.load(tokens_ptr + rows, mask=row_mask, other=0)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C
        a = tl.load(x_ptr + token[:, None] * C + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
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


@triton.jit
def _grouped_matmul_scatter_kernel(a_ptr, w_ptr, scale_ptr, out_rows_ptr, out_ptr, tile_expert_ptr,
                                   tile_start_ptr, group_end_ptr, K_DIM, N_DIM, stride_we, stride_wk, stride_wn,
                                   SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """out[out_rows[r]] = scale[r] * a[r] @ w[e]: a (NK, K_DIM) sorted rows, w[e] (K_DIM, N_DIM) through
    strides (a transposed view works), out (NK, N_DIM) in slot order, one row per (token, slot)."""
    expert, start, end, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, group_end_ptr, BLOCK_M)
    if start >= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_DIM
    acc = _tile_matmul(a_ptr, rows, row_mask, w_ptr, expert, cols, col_mask, K_DIM, stride_we, stride_wk, stride_wn,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    if SCALE:
        acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    dest = tl.load(out_rows_ptr + rows, mask=row_mask, other=0)
    tl.store(out_ptr + dest[:, None] * N_DIM + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_swiglu_backward_kernel(dy_ptr, w_ptr, tokens_ptr, pre_ptr, scale_ptr, d_pre_ptr, d_scale_ptr,
                                 tile_expert_ptr, tile_start_ptr, group_end_ptr, C, H, stride_we, stride_wh,
                                 stride_wc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Back through the routing weight, the down projection and SwiGLU, for a (rows, hidden columns) tile:
    g = dy[tokens[r]] @ w_down[e]^T; d_scale partial = sum(g * act) over the tile's columns;
    d_act = scale * g; d_pre = (d_act * up * silu'(gate), d_act * silu(gate))."""
    expert, start, end, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, group_end_ptr, BLOCK_M)
    if start >= end:
        return
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    token = tl.load(tokens_ptr + rows, mask=row_mask, other=0)
    g = _tile_matmul(dy_ptr, token, row_mask, w_ptr, expert, cols, col_mask, C, stride_we, stride_wc, stride_wh,
                     BLOCK_M, BLOCK_N, BLOCK_K)  # w_down[e]^T read as a (C, H) matrix
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


@triton.jit
def _grouped_weight_grad_kernel(a_ptr, b_ptr, a_rows_ptr, b_rows_ptr, scale_ptr, dw_ptr, group_start_ptr,
                                group_end_ptr, M_DIM, N_DIM, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                                SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """dw[e] = a[rows of e]^T @ (scale * b[rows of e]): (M_DIM, N_DIM) for one expert and one output tile.
    a rows are x[tokens[r]] (GATHER_A) or sorted rows, likewise b. Every program owns its output tile, so no
    atomics; an expert with no rows gets zeros."""
    expert = tl.program_id(0)
    n_tiles_n = tl.cdiv(N_DIM, BLOCK_N)
    ms = (tl.program_id(1) // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(1) % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = ms < M_DIM, ns < N_DIM
    start = tl.load(group_start_ptr + expert)
    end = tl.load(group_end_ptr + expert)
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


def tile_plan(counts, n_rows, block_m):
    """Row tiles that never straddle two experts, made with tensor ops only (no host sync). counts (E,) rows
    per expert, n_rows = NK. Returns tile_expert, tile_start (T,) for T = cdiv(NK, block_m) + E tiles (an
    upper bound: the spare ones get expert E and start 0), group_start (E,) and group_end (E + 1,), end[E] = 0."""
    E = counts.shape[0]
    group_end = counts.cumsum(0)
    group_start = group_end - counts
    tiles = (counts + block_m - 1) // block_m  # (E,)
    first_tile = tiles.cumsum(0) - tiles
    t = torch.arange(triton.cdiv(n_rows, block_m) + E, device=counts.device)
    tile_expert = torch.searchsorted(tiles.cumsum(0), t, right=True)  # E past the last real tile
    e = tile_expert.clamp(max=E - 1)
    tile_start = torch.where(tile_expert < E, group_start[e] + (t - first_tile[e]) * block_m, 0)
    return tile_expert, tile_start, group_start, torch.cat([group_end, group_end.new_zeros(1)])


BLOCK = {"M": 64, "N": 64, "K": 32}  # tile sizes; the interpreter runs them on the CPU too


class TritonMoE(torch.autograd.Function):
    """moe_mlp through the Triton kernels above; the backward is written out, kernel by kernel."""

    @staticmethod
    def forward(ctx, x, w_up_gate, w_down, weights, experts):
        (N, C), (E, _, H2), K = x.shape, w_up_gate.shape, experts.shape[1]
        H, NK = H2 // 2, N * K
        x, w_up_gate, w_down = x.contiguous(), w_up_gate.contiguous(), w_down.contiguous()
        order, tokens, counts = sort_by_expert(experts, E)
        tile_expert, tile_start, group_start, group_end = plan = tile_plan(counts, NK, BLOCK["M"])
        scale = weights.flatten()[order].float().contiguous()  # (NK,) routing weight of each sorted slot
        pre = x.new_empty(NK, 2 * H)  # gate and up pre-activations, kept for the backward
        act = x.new_empty(NK, H)
        grid = (tile_expert.numel(), triton.cdiv(H, BLOCK["N"]))
        _up_gate_swiglu_kernel[grid](x, w_up_gate, tokens, pre, act, *plan[:2], group_end, C, H,
                                     *w_up_gate.stride(), BLOCK_M=BLOCK["M"], BLOCK_N=BLOCK["N"], BLOCK_K=BLOCK["K"])
        y_slots = x.new_empty(NK, C)  # one output row per (token, slot), summed below: no atomics
        grid = (tile_expert.numel(), triton.cdiv(C, BLOCK["N"]))
        _grouped_matmul_scatter_kernel[grid](act, w_down, scale, order, y_slots, *plan[:2], group_end, H, C,
                                             *w_down.stride(), SCALE=True, BLOCK_M=BLOCK["M"], BLOCK_N=BLOCK["N"],
                                             BLOCK_K=BLOCK["K"])
        ctx.save_for_backward(x, w_up_gate, w_down, scale, order, tokens, pre, act, *plan)
        ctx.weights_dtype = weights.dtype
        return y_slots.view(N, K, C).sum(1, dtype=torch.float32).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_up_gate, w_down, scale, order, tokens, pre, act, tile_expert, tile_start, group_start, group_end = \
            ctx.saved_tensors
        (N, C), (E, H, _), NK = x.shape, w_down.shape, pre.shape[0]
        dy = dy.contiguous().to(x.dtype)
        blocks = dict(BLOCK_M=BLOCK["M"], BLOCK_N=BLOCK["N"], BLOCK_K=BLOCK["K"])
        rows_grid = tile_expert.numel()
        # through the routing weight, w_down and SwiGLU: d_pre (NK, 2H), routing-weight partial sums
        d_pre = x.new_empty(NK, 2 * H)
        d_scale = torch.empty(NK, triton.cdiv(H, BLOCK["N"]), dtype=torch.float32, device=x.device)
        w_down_t = w_down.stride()  # w_down[e]^T (C, H) read through w_down's strides
        _down_swiglu_backward_kernel[(rows_grid, d_scale.shape[1])](
            dy, w_down, tokens, pre, scale, d_pre, d_scale, tile_expert, tile_start, group_end, C, H,
            w_down_t[0], w_down_t[1], w_down_t[2], **blocks)
        # d_x: d_pre @ w_up_gate[e]^T, one row per slot, summed per token
        dx_slots = x.new_empty(NK, C)
        w1 = w_up_gate.stride()  # w_up_gate[e]^T (2H, C): k along 2H (stride 2), n along C (stride 1)
        _grouped_matmul_scatter_kernel[(rows_grid, triton.cdiv(C, BLOCK["N"]))](
            d_pre, w_up_gate, scale, order, dx_slots, tile_expert, tile_start, group_end, 2 * H, C, w1[0], w1[2],
            w1[1], SCALE=False, **blocks)
        dx = dx_slots.view(N, -1, C).sum(1, dtype=torch.float32).to(x.dtype)
        # weight gradients, one expert and one output tile per program
        d_w_down = torch.empty_like(w_down)  # act^T @ (scale * dy[tokens])
        _grouped_weight_grad_kernel[(E, triton.cdiv(H, BLOCK["M"]) * triton.cdiv(C, BLOCK["N"]))](
            act, dy, tokens, tokens, scale, d_w_down, group_start, group_end, H, C, GATHER_A=False, GATHER_B=True,
            SCALE=True, **blocks)
        d_w_up_gate = torch.empty_like(w_up_gate)  # x[tokens]^T @ d_pre
        _grouped_weight_grad_kernel[(E, triton.cdiv(C, BLOCK["M"]) * triton.cdiv(2 * H, BLOCK["N"]))](
            x, d_pre, tokens, tokens, scale, d_w_up_gate, group_start, group_end, C, 2 * H, GATHER_A=True,
            GATHER_B=False, SCALE=False, **blocks)
        d_weights = torch.empty(NK, dtype=torch.float32, device=x.device)
        d_weights[order] = d_scale.sum(1)  # back from sorted slots to (token, slot) order
        return dx, d_w_up_gate, d_w_down, d_weights.view(N, -1).to(ctx.weights_dtype), None


def moe_mlp_triton(x, w_up_gate, w_down, weights, experts):
    """Fused Triton expert computation (see the file docstring); the same interface as moe_mlp_torch."""
    if torch.is_autocast_enabled(x.device.type):  # autocast cannot see into a custom Function: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_up_gate, w_down = x.to(dtype), w_up_gate.to(dtype), w_down.to(dtype)
    return TritonMoE.apply(x, w_up_gate, w_down, weights, experts)


def kernel_choice(device):
    """'triton' on CUDA, 'torch' elsewhere, unless NANOEMO_KERNEL says otherwise; with the reason."""
    forced = os.environ.get("NANOEMO_KERNEL", "auto")
    if forced not in ("auto", "torch", "triton"):
        raise ValueError(f"NANOEMO_KERNEL must be auto, torch or triton, got {forced!r}")
    if forced != "auto":
        return forced, "forced by NANOEMO_KERNEL"
    if device.type == "cuda":
        return "triton", "CUDA device"
    return "torch", f"{device.type} device (Triton needs CUDA, or TRITON_INTERPRET=1 with NANOEMO_KERNEL=triton)"


def moe_mlp(x, w_up_gate, w_down, weights, experts):
    """The expert computation by the path kernel_choice() picks for x's device."""
    path = moe_mlp_triton if kernel_choice(x.device)[0] == "triton" else moe_mlp_torch
    return path(x, w_up_gate, w_down, weights, experts)
