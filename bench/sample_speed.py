"""
Sampling speed with and without the KV cache: tokens/s of greedy generation of 200 new tokens after a
200-token prompt, for a config's model (random weights: speed does not depend on them) with seq_len raised to
hold prompt and answer, its weights in float32 or (--weights=bfloat16) bfloat16. Not a test.

    python bench/sample_speed.py config/emo_tiny.py
    python bench/sample_speed.py config/emo_full.py --n_experts=16 --prompt_tokens=32 --new_tokens=32 --weights=bfloat16
    python bench/sample_speed.py config/emo_small.py --device=cuda
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from model import EMO, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402


@dataclass
class SampleConfig:
    prompt_tokens: int = 200
    new_tokens: int = 200
    batch: int = 1
    weights: str = "float32"  # or bfloat16


def main():
    (train_cfg, model_cfg, bench), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, SampleConfig)
    device = torch.device("cuda" if train_cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if train_cfg.device == "auto" else train_cfg.device)
    cfg = dataclasses.replace(model_cfg, seq_len=max(model_cfg.seq_len, bench.prompt_tokens + bench.new_tokens))
    torch.manual_seed(0)
    if bench.weights not in ("float32", "bfloat16"):
        raise SystemExit(f"--weights={bench.weights}: float32 or bfloat16")
    model = EMO(cfg).to(device, getattr(torch, bench.weights)).eval()
    prompt = torch.randint(0, cfg.vocab_size - 1, (bench.batch, bench.prompt_tokens), device=device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{device} ({torch.get_num_threads()} threads, {bench.weights}) | {bench.batch} x ({bench.prompt_tokens} "
          f"prompt + {bench.new_tokens} new tokens), greedy | {n_params / 1e6:.1f}M parameters")
    speeds, outputs = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, bench.new_tokens, temperature=0, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        speeds[use_cache] = bench.batch * bench.new_tokens / (time.perf_counter() - start)
        print(f"  {'with' if use_cache else 'without'} KV cache: {speeds[use_cache]:8.1f} tokens/s")
    print(f"cache speed-up: {speeds[True] / speeds[False]:.1f}x | same tokens: "
          f"{torch.equal(outputs[True], outputs[False])}")


if __name__ == "__main__":
    main()
