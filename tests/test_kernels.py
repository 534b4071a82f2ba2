"""Expert-computation tests: the loop (reference) path against a dense computation, the grouped-GEMM and
Triton paths against the loop, values and every gradient.

    python -m pytest tests/test_kernels.py -q
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from errors import UserError
from kernels import CHOSEN_PATHS, expert_path, moe_mlp_grouped, moe_mlp_loop, sort_by_expert
from triton_moe import _tile_rows


@pytest.fixture(autouse=True)
def forget_the_expert_path():
    """Tests here change NANOEMO_KERNEL; expert_path remembers its choice: forget it after each."""
    yield
    CHOSEN_PATHS.clear()


def dense_reference(x, w_up_gate, w_down, weights, experts):
    """Every expert on every token, weighted by a dense (N, E) routing matrix that is 0 where not chosen."""
    E, H = w_up_gate.shape[0], w_down.shape[1]
    dense_weights = torch.zeros(x.shape[0], E, dtype=weights.dtype).scatter_add(1, experts, weights)  # (N, E)
    h = torch.einsum("nc,ech->neh", x, w_up_gate)  # (N, E, 2H)
    act = F.silu(h[..., :H]) * h[..., H:]  # (N, E, H)
    y = torch.einsum("neh,ehc->nec", act, w_down)  # (N, E, C)
    return (y * dense_weights[..., None]).sum(1)


# Triton runs compiled on a GPU, in its interpreter on the CPU (tests/conftest.py). On a GPU, tl.dot of
# float32 operands runs in TF32: a looser tolerance there.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RTOL = 2e-2 if DEVICE == "cuda" else 1e-4


def problem(N, C, H, E, K, seed=0, skip_experts=(), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    w_up_gate = torch.randn(E, C, 2 * H, generator=g) / C ** 0.5
    w_down = torch.randn(E, H, C, generator=g) / H ** 0.5
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    scores = torch.rand(N, len(allowed), generator=g)
    experts = allowed[scores.topk(K, dim=1).indices]  # (N, K) distinct experts per token
    weights = torch.rand(N, K, generator=g)
    return [t.to(device).requires_grad_(t.is_floating_point()) for t in (x, w_up_gate, w_down, weights, experts)]


@pytest.mark.parametrize("N,C,H,E,K,skip", [
    (37, 16, 24, 8, 3, (2, 5)),  # experts 2 and 5 receive no tokens
    (1, 8, 8, 4, 2, ()),  # a single token
    (64, 12, 20, 16, 4, tuple(range(8, 16))),  # half the experts empty
])
def test_loop_path_equals_dense_reference(N, C, H, E, K, skip):
    inputs = problem(N, C, H, E, K, skip_experts=skip)
    assert_same_values_and_gradients(moe_mlp_loop, dense_reference, inputs, skip, rtol=1e-5)


GROUPED_CASES = [
    # N, C, H, E, K, experts given no tokens, description
    (37, 16, 24, 8, 3, (2, 5), "two experts without tokens"),
    (1, 8, 8, 4, 2, (), "a single token"),
    (70, 32, 16, 6, 1, (0, 1, 2, 3, 4), "all tokens to one expert"),
    (80, 40, 24, 128, 8, (), "128 experts, top 8"),
    (64, 12, 20, 16, 4, tuple(range(8, 16)), "half the experts empty"),
    (0, 8, 8, 4, 2, (), "no tokens at all"),
]


@pytest.mark.parametrize("N,C,H,E,K,skip,description", GROUPED_CASES, ids=[c[-1] for c in GROUPED_CASES])
def test_grouped_mm_path_equals_loop_path(N, C, H, E, K, skip, description):
    inputs = problem(N, C, H, E, K, seed=3, skip_experts=skip)
    assert_same_values_and_gradients(moe_mlp_grouped, moe_mlp_loop, inputs, skip, rtol=1e-5)


def test_grouped_mm_path_in_bfloat16_and_under_autocast():
    x, w1, w2, weights, experts = problem(48, 16, 16, 8, 2, seed=4)
    reference = moe_mlp_loop(x, w1, w2, weights, experts)
    y = moe_mlp_grouped(x.detach().bfloat16(), w1.detach().bfloat16(), w2.detach().bfloat16(), weights, experts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 parameters, bfloat16 compute
        y = moe_mlp_grouped(x, w1, w2, weights, experts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=5e-2, atol=5e-2)


def test_grouped_mm_path_refuses_what_it_cannot_run():
    x, w1, w2, weights, experts = problem(8, 8, 8, 4, 2)
    with pytest.raises(UserError, match="NANOEMO_KERNEL=loop"):
        moe_mlp_grouped(x.double(), w1.double(), w2.double(), weights, experts)
    x, w1, w2, weights, experts = problem(8, 8, 5, 4, 2)  # rows of 5 floats: not a multiple of 16 bytes
    with pytest.raises(UserError, match="NANOEMO_KERNEL=loop"):
        moe_mlp_grouped(x, w1, w2, weights, experts)


def assert_same_values_and_gradients(fn, reference, inputs, empty_experts, rtol):
    """fn and reference agree on the output and on the gradients of x, both weights and the routing
    weights; experts that received no tokens get exact zero gradients."""
    y, y_ref = fn(*inputs), reference(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=max(rtol, 1e-5), atol=1e-5 if rtol < 1e-3 else rtol)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs[:4], grad)
    grads_ref = torch.autograd.grad(y_ref, inputs[:4], grad)
    for name, g, g_ref in zip(("x", "w_up_gate", "w_down", "weights"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=1e-5 if rtol < 1e-3 else rtol,
                                   msg=lambda m: f"{name}: {m}")
    for e in empty_experts:
        assert (grads[1][e] == 0).all() and (grads[2][e] == 0).all()


def test_sort_by_expert_groups_slots():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, tokens, counts = sort_by_expert(experts, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert experts.flatten()[order].tolist() == [0, 0, 1, 1, 2, 2]
    assert tokens.tolist() == [0, 1, 1, 2, 0, 2]  # token order kept inside each group


def test_loop_path_keeps_dtype():
    x, w1, w2, weights, experts = problem(10, 8, 8, 4, 2)
    y = moe_mlp_loop(x.detach().bfloat16(), w1.detach().bfloat16(), w2.detach().bfloat16(), weights, experts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), dense_reference(x, w1, w2, weights, experts), rtol=5e-2, atol=5e-2)


# The Triton path against the loop path. On CPU the kernels run in Triton's interpreter (tests/conftest.py).
TRITON_CASES = [
    # N, C, H, E, K, experts given no tokens, description
    (37, 48, 40, 8, 3, (2, 5), "odd sizes, two experts without tokens"),
    (1, 32, 32, 4, 2, (), "a single token"),
    (70, 32, 16, 6, 1, (0, 1, 2, 3, 4), "all tokens to one expert"),
    (80, 40, 24, 128, 8, (), "128 experts, top 8"),
    (150, 64, 96, 4, 4, (), "groups longer than a tile"),
]


@pytest.mark.parametrize("N,C,H,E,K,skip,description", TRITON_CASES, ids=[c[-1] for c in TRITON_CASES])
def test_triton_path_equals_loop_path(N, C, H, E, K, skip, description):
    from kernels import moe_mlp_triton
    inputs = problem(N, C, H, E, K, seed=1, skip_experts=skip, device=DEVICE)
    assert_same_values_and_gradients(moe_mlp_triton, moe_mlp_loop, inputs, skip, rtol=TRITON_RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter (triton 3.6) computes tl.dot of "
                    "bfloat16 operands wrongly, so bfloat16 is checked on a GPU only")
def test_triton_path_in_bfloat16():
    from kernels import moe_mlp_triton
    x, w1, w2, weights, experts = problem(40, 32, 32, 8, 2, seed=2, device="cuda")
    bf16 = [t.detach().bfloat16() for t in (x, w1, w2)]
    y = moe_mlp_triton(*bf16, weights.detach(), experts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), moe_mlp_loop(x, w1, w2, weights, experts), rtol=3e-2, atol=3e-2)


def test_model_trains_the_same_with_every_path(monkeypatch):
    """A whole forward and backward of a small EMO model: grouped_mm and Triton paths == loop path."""
    from model import EMO, ModelConfig
    torch.manual_seed(0)
    model = EMO(ModelConfig(vocab_size=64, eos_id=0, seq_len=16, n_layer=2, n_head=2, d_model=32, n_experts=8,
                            top_k=3, expert_hidden=32, router="std")).to(DEVICE)
    idx = torch.randint(0, 64, (2, 16), device=DEVICE)
    results = {}
    for path in ("loop", "grouped_mm", "triton"):
        monkeypatch.setenv("NANOEMO_KERNEL", path)
        CHOSEN_PATHS.clear()  # the choice is remembered: forget it
        model.zero_grad()
        loss, _ = model(idx, idx)
        loss.backward()
        results[path] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    for path in ("grouped_mm", "triton"):
        rtol = TRITON_RTOL if path == "triton" else 1e-4
        assert results[path][0] == pytest.approx(results["loop"][0], rel=rtol / 100)
        for g, g_loop in zip(results[path][1], results["loop"][1]):
            torch.testing.assert_close(g, g_loop, rtol=rtol, atol=1e-6 if rtol < 1e-3 else rtol)


@triton.jit
def which_rows(counts_ptr, group_end_ptr, out_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Write the rows (or -1) and the expert that _tile_rows gives each program."""
    expert, rows, row_mask, real = _tile_rows(counts_ptr, group_end_ptr, E, BLOCK_M, E_POW2)
    tile = tl.program_id(0)
    tl.store(out_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(row_mask & real, rows, -1))
    tl.store(out_ptr + 1000 + tile, expert)


def test_row_tiles_cover_every_row_once():
    """Each program of the Triton kernels finds its own expert and rows from the per-expert counts."""
    counts = torch.tensor([5, 0, 17, 1, 0, 8])
    group_end = counts.cumsum(0)
    n_tiles = 31 // 4 + 6  # the grid's upper bound
    out = torch.full((1000 + n_tiles,), -7, dtype=torch.int64, device=DEVICE)
    which_rows[(n_tiles,)](counts.to(DEVICE), group_end.to(DEVICE), out, 6, BLOCK_M=4, E_POW2=8)
    out = out.cpu()
    rows = out[:n_tiles * 4].view(n_tiles, 4)
    covered = rows[rows >= 0].tolist()
    assert covered == list(range(31))  # every row once, in order
    experts = out[1000:].tolist()
    for tile_rows, e in zip(rows.tolist(), experts):
        inside = [r for r in tile_rows if r >= 0]
        if inside:  # a tile's rows all belong to its expert
            assert all(group_end[e] - counts[e] <= r < group_end[e] for r in inside)
    assert experts[-1] >= 6  # spare tiles past the last expert do nothing


def test_expert_path_choice(monkeypatch):
    monkeypatch.delenv("NANOEMO_KERNEL", raising=False)
    CHOSEN_PATHS.clear()
    assert expert_path("cpu", torch.float32, (64, 64))[0] == "grouped_mm"
    assert expert_path("cuda", torch.bfloat16, (64, 64))[0] == "grouped_mm"  # until a GPU measurement
    assert expert_path("cpu", torch.float64, (64, 64))[0] == "loop"  # grouped_mm cannot run float64
    assert expert_path("cpu", torch.float32, (5, 64))[0] == "loop"  # nor rows of 20 bytes
    monkeypatch.setenv("NANOEMO_KERNEL", "triton")
    assert expert_path("cpu", torch.float32, (64, 64))[0] == "grouped_mm"  # decided once, remembered
    CHOSEN_PATHS.clear()
    assert expert_path("cuda", torch.float32, (64, 64)) == ("triton", "forced by NANOEMO_KERNEL")
    monkeypatch.setenv("NANOEMO_KERNEL", "fast")
    CHOSEN_PATHS.clear()
    with pytest.raises(UserError, match="NANOEMO_KERNEL"):
        expert_path("cpu", torch.float32, (64, 64))
