"""
Training throughput of a config: tokens/s, step time and MFU of the EMO router and of its standard twin
(same model, router='std'), on synthetic batches with documents of mean length doc_len. Not a test.

    python bench/train_throughput.py config/emo_tiny.py
    python bench/train_throughput.py config/emo_small.py --steps=30
    python bench/train_throughput.py config/emo_full.py --n_layer=2 --batch_size=2   # the release's layer shape
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from model import ModelConfig  # noqa: E402
from train import PEAK_FLOPS, TrainConfig, build_model, configure_optimizer, setup_distributed  # noqa: E402


@dataclass
class BenchConfig:
    steps: int = 20  # timed steps, after warmup
    warmup: int = 3
    doc_len: int = 600  # mean document length in tokens (EOS placed at random with rate 1/doc_len)


def synthetic_batch(model_cfg, cfg, bench, device, generator):
    shape = (cfg.batch_size, model_cfg.seq_len + 1)
    tokens = torch.randint(0, model_cfg.vocab_size, shape, generator=generator)
    tokens[torch.rand(shape, generator=generator) < 1 / bench.doc_len] = model_cfg.eos_id
    tokens = tokens.to(device)
    return tokens[:, :-1], tokens[:, 1:]


def time_steps(model_cfg, cfg, bench, device):
    """Median seconds per optimizer step (forward, backward, AdamW) and the model."""
    model, raw = build_model(model_cfg, cfg, device, world=1)
    optimizer = configure_optimizer(raw, cfg, device)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else torch.float32
    times = []
    for step in range(bench.warmup + bench.steps):
        x, y = synthetic_batch(model_cfg, cfg, bench, device, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss, _ = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= bench.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], raw


def main():
    (cfg, model_cfg, bench), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, BenchConfig)
    _, _, device = setup_distributed(cfg)
    peak = cfg.peak_flops or next((v for k, v in PEAK_FLOPS.items()
                                   if device.type == "cuda" and k in torch.cuda.get_device_name(device)), 0.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name} | torch {torch.__version__} | batch {cfg.batch_size} x {model_cfg.seq_len} tokens")
    results = {}
    for router in ("emo", "std"):
        twin = dataclasses.replace(model_cfg, router=router)
        seconds, raw = time_steps(twin, cfg, bench, device)
        tokens = cfg.batch_size * twin.seq_len
        mfu = raw.flops_per_token(twin.seq_len) * tokens / seconds / peak if peak else None
        results[router] = seconds
        total, active = raw.num_params()
        print(f"{router}: {seconds * 1000:.1f} ms/step | {tokens / seconds:,.0f} tok/s | "
              f"MFU {f'{mfu:.1%}' if mfu else '- (no peak FLOP/s known for this device)'} | "
              f"{total / 1e6:.1f}M total, {active / 1e6:.1f}M active parameters")
        del raw
    print(f"EMO / std step time: {results['emo'] / results['std']:.3f}")


if __name__ == "__main__":
    main()
