"""
Expert-computation benchmark: forward + backward time and TFLOP/s of every way to run the SwiGLU experts of
top-k routed tokens, at two shapes, and the whole MoE layer (document-pool router included) against the bare
expert computation. Ratios are to the grouped_mm path and to a dense GEMM chain of equal FLOPs (the ceiling).
Not a test.

    python bench/kernels.py                       # on a GPU: shapes 'release' and 'small', bfloat16
    python bench/kernels.py --shapes cpu          # on a CPU: a toy shape, float32, no Triton
    python bench/kernels.py --json out.json       # also write every time and ratio as JSON

    release   16384 tokens, d 2048, expert hidden 1024, 128 experts, top 8 (the 1B/14B model's layer)
    small     32768 tokens, d 768, hidden 384, 64 experts, top 8
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import moe_mlp_grouped, moe_mlp_loop, moe_mlp_triton, swiglu  # noqa: E402
from model import MoE, ModelConfig  # noqa: E402
from router import document_ids  # noqa: E402

SHAPES = {
    "release": dict(tokens=16384, d=2048, hidden=1024, experts=128, top_k=8),
    "small": dict(tokens=32768, d=768, hidden=384, experts=64, top_k=8),
    "cpu": dict(tokens=4096, d=128, hidden=128, experts=64, top_k=4),  # emo_tiny's layer, one batch
}


def moe_mlp_where_loop(x, w_up_gate, w_down, weights, experts):
    """The Hugging Face way: a Python loop over experts, torch.where to find each one's tokens."""
    y = torch.zeros_like(x)
    for e in range(w_up_gate.shape[0]):
        token, slot = torch.where(experts == e)
        if len(token):
            out = swiglu(x[token] @ w_up_gate[e]) @ w_down[e]
            y.index_add_(0, token, out * weights[token, slot, None].to(x.dtype))
    return y


def dense_chain(x, w_up_gate, w_down, weights, experts):
    """The same FLOPs as one dense SwiGLU MLP over N*K rows: the practical ceiling."""
    rows = x.repeat(experts.shape[1], 1)
    return swiglu(rows @ w_up_gate[0]) @ w_down[0]


def problem(shape, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    N, C, H, E, K = (shape[k] for k in ("tokens", "d", "hidden", "experts", "top_k"))
    x = torch.randn(N, C, device=device, dtype=dtype, generator=g)
    w_up_gate = torch.randn(E, C, 2 * H, device=device, dtype=dtype, generator=g) / C ** 0.5
    w_down = torch.randn(E, H, C, device=device, dtype=dtype, generator=g) / H ** 0.5
    logits = torch.randn(N, E, device=device, generator=g)
    weights, experts = logits.softmax(-1).topk(K, dim=-1)
    return [t.requires_grad_(t.is_floating_point()) for t in (x, w_up_gate, w_down, weights, experts)]


def timed(fn, inputs, repeats, device):
    """Median seconds of forward + backward."""
    def run():
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def moe_layer(shape, device, dtype, doc_len=600):
    """The whole MoE layer of model.py in training mode: EMO document-pool router + expert computation."""
    N, C, H, E, K = (shape[k] for k in ("tokens", "d", "hidden", "experts", "top_k"))
    cfg = ModelConfig(vocab_size=1000, eos_id=0, d_model=C, n_head=max(C // 128, 1), n_experts=E, n_shared=1,
                      top_k=K, expert_hidden=H, router="emo", pool_min=max(E // 16, K), pool_max=E)
    layer = MoE(cfg, E).to(device=device, dtype=dtype).train()
    idx = torch.randint(1, 1000, (N // 4096 or 1, min(N, 4096)), device=device)
    idx[torch.rand(idx.shape, device=device) < 1 / doc_len] = 0
    doc_ids = document_ids(idx, 0)
    x = torch.randn(*idx.shape, C, device=device, dtype=dtype, requires_grad=True)
    return lambda x_, d_: layer(x_, d_)[0], [x, doc_ids]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="release,small")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip_loops", action="store_true", help="skip the two slow per-expert loops")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name} | torch {torch.__version__} | {dtype}")
    paths = {"dense (ceiling)": dense_chain, "grouped_mm": moe_mlp_grouped}
    if device.type == "cuda":
        paths["triton"] = moe_mlp_triton
    if not args.skip_loops:
        paths.update({"loop (reference)": moe_mlp_loop, "torch.where loop": moe_mlp_where_loop})
    report = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "shapes": {}}
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        N, C, H, K = shape["tokens"], shape["d"], shape["hidden"], shape["top_k"]
        flops = 18 * N * K * C * H  # fwd + bwd of the two GEMMs (3 C H multiply-adds per routed token)
        print(f"\n{shape_name}: {shape}")
        inputs = problem(shape, device, dtype)
        seconds = {label: timed(fn, inputs, args.repeats if "loop" not in label else 2, device)
                   for label, fn in paths.items()}
        base, ceiling = seconds["grouped_mm"], seconds["dense (ceiling)"]
        for label, s in seconds.items():
            print(f"  {label:<18}{s * 1000:9.2f} ms {flops / s / 1e12:8.1f} TFLOP/s  {ceiling / s:6.1%} of dense  "
                  f"{base / s:5.2f}x grouped_mm")
        layer_fn, layer_inputs = moe_layer(shape, device, dtype)
        layer_s = timed(layer_fn, layer_inputs, args.repeats, device)
        print(f"  MoE layer (EMO router + experts, automatic kernel): {layer_s * 1000:.2f} ms = "
              f"{layer_s / base:.3f}x the bare grouped_mm expert computation")
        report["shapes"][shape_name] = {"shape": shape, "ms": {k: v * 1000 for k, v in seconds.items()},
                                        "tflops": {k: flops / v / 1e12 for k, v in seconds.items()},
                                        "speedup_vs_grouped_mm": {k: base / v for k, v in seconds.items()},
                                        "moe_layer_ms": layer_s * 1000}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
