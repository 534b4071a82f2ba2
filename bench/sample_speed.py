"""
Decoding speed against its memory bound: tokens/s of greedy decoding with the KV cache (batch 1) for a config's
model (random weights: speed does not depend on them), its weights in float32 or (--weights=bfloat16)
bfloat16, laid out for decoding (EMO.for_decoding). Each new token reads the weights it uses once: attention,
router, the top_k experts of every layer and the LM head; with this machine's bandwidth (a matrix-vector
product over 1 GiB of weights, the same dtype) that bounds the rate. Printed: bytes per token, bandwidth, the
bound, the rate reached and its share of the bound, and whether the tokens equal the training layout's. Not a
test.

    python bench/sample_speed.py config/emo_full.py --n_experts=16 --weights=float32    # the release at 12.5%
    python bench/sample_speed.py config/emo_full.py --n_experts=16 --weights=bfloat16
    python bench/sample_speed.py config/emo_tiny.py --prompt_tokens=200 --new_tokens=200
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from model import EMO, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402


@dataclass
class SampleConfig:
    prompt_tokens: int = 32
    new_tokens: int = 32
    weights: str = "float32"  # or bfloat16


def bytes_per_token(cfg, itemsize):
    """Bytes of weights one decoded token reads: per layer attention (4 C^2), router (E C), top_k experts
    (3 C H each), two norms; then the final norm and the LM head (V C); the embedding row."""
    C = cfg.d_model
    per_layer = [4 * C * C + E * C + min(cfg.top_k, E) * 3 * C * cfg.expert_hidden + 2 * C
                 for E in cfg.layer_experts()]
    return (sum(per_layer) + C + cfg.vocab_size * C + C) * itemsize


def bandwidth(dtype, gib=1.0, repeats=5):
    """Bytes/s of a matrix-vector product over gib GiB of weights laid out output x input (the best of repeats)."""
    columns = 16384
    rows = int(gib * 2 ** 30 / dtype.itemsize / columns)
    weight = torch.randn(rows, columns).to(dtype)
    x = torch.randn(1, columns).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return weight.numel() * dtype.itemsize / best


def decode(model, prompt, new_tokens):
    """(tokens, seconds per new token after the first): greedy, with the KV cache."""
    first = model.generate(prompt, 1, temperature=0)
    start = time.perf_counter()
    tokens = model.generate(prompt, new_tokens, temperature=0)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, 1, temperature=0)  # the prompt and one token: taken off the total
    prompt_seconds = time.perf_counter() - start
    assert torch.equal(tokens[:, :first.shape[1]], first)
    return tokens, (seconds - prompt_seconds) / (new_tokens - 1)


def main():
    (train_cfg, model_cfg, bench), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, SampleConfig)
    if bench.weights not in ("float32", "bfloat16"):
        raise SystemExit(f"--weights={bench.weights}: float32 or bfloat16")
    dtype = getattr(torch, bench.weights)
    cfg = dataclasses.replace(model_cfg, seq_len=max(model_cfg.seq_len, bench.prompt_tokens + bench.new_tokens))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EMO(cfg)
    model.to(dtype).to_empty(device="cpu")
    model.init_weights()
    model.eval()
    prompt = torch.randint(0, cfg.vocab_size - 1, (1, bench.prompt_tokens))
    n_params = sum(p.numel() for p in model.parameters())
    per_token = bytes_per_token(cfg, dtype.itemsize)
    rate = bandwidth(dtype)
    print(f"cpu ({torch.get_num_threads()} threads, {bench.weights}) | {n_params / 1e9:.2f}B parameters | "
          f"{bench.prompt_tokens} prompt + {bench.new_tokens} new tokens, greedy, batch 1")
    reference, reference_seconds = decode(model, prompt, bench.new_tokens)
    model.for_decoding()
    tokens, seconds = decode(model, prompt, bench.new_tokens)
    bound = rate / per_token
    print(f"bytes read per token {per_token / 1e9:.3f} GB | bandwidth {rate / 1e9:.1f} GB/s | bound "
          f"{bound:.2f} tokens/s")
    print(f"training layout {1 / reference_seconds:.2f} tokens/s ({1 / reference_seconds / bound:.0%} of the bound)"
          f" | decoding layout {1 / seconds:.2f} tokens/s ({1 / seconds / bound:.0%} of the bound) | same tokens: "
          f"{torch.equal(tokens, reference)}")


if __name__ == "__main__":
    main()
