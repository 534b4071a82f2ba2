"""
Training throughput of a config: tokens/s, step time and MFU of the EMO router and of its standard twin
(the same config with router='std'), on synthetic batches with documents of mean length doc_len; the time
to compile when --compile=True (the first warmup step). Not a test.

    python bench/train_throughput.py config/emo_tiny.py
    python bench/train_throughput.py config/emo_small.py --steps=30 --compile=True
    python bench/train_throughput.py config/emo_full.py --n_layer=2 --batch_size=2 --parallel=ddp  # release layers
    python bench/train_throughput.py config/emo_small.py --json=out/throughput.json
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from kernels import expert_path  # noqa: E402
from model import ModelConfig  # noqa: E402
from parallel import build_model, peak_flops, setup_distributed  # noqa: E402
from train import TrainConfig, configure_optimizer  # noqa: E402


@dataclass
class BenchConfig:
    steps: int = 20  # timed steps, after warmup
    warmup: int = 3
    doc_len: int = 600  # mean document length in tokens (EOS placed at random with rate 1/doc_len)
    json: str = ""  # also write the results to this file


def synthetic_batch(model_cfg, cfg, bench, device, generator):
    shape = (cfg.batch_size, model_cfg.seq_len + 1)
    tokens = torch.randint(0, model_cfg.vocab_size, shape, generator=generator)
    tokens[torch.rand(shape, generator=generator) < 1 / bench.doc_len] = model_cfg.eos_id
    tokens = tokens.to(device)
    return tokens[:, :-1], tokens[:, 1:]


def compute_dtype(cfg, device):
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def time_steps(model_cfg, cfg, bench, device):
    """(median seconds per optimizer step (forward, backward, AdamW), seconds of the first step, the model)."""
    dtype = compute_dtype(cfg, device)
    model, raw = build_model(model_cfg, cfg, device, 1, dtype)
    optimizer = configure_optimizer(raw, cfg, device)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(bench.warmup + bench.steps):
        x, y = synthetic_batch(model_cfg, cfg, bench, device, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[bench.warmup:])[len(times[bench.warmup:]) // 2], times[0], raw


def main():
    (cfg, model_cfg, bench), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, BenchConfig)
    _, _, device = setup_distributed(cfg)
    peak = peak_flops(device, cfg.peak_flops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    dtype = compute_dtype(cfg, device)
    kernel = expert_path(device.type, dtype, (model_cfg.expert_hidden, model_cfg.d_model))[0]
    print(f"device {name} | torch {torch.__version__} | {dtype} | kernel {kernel} | compile {cfg.compile} | "
          f"batch {cfg.batch_size} x {model_cfg.seq_len} tokens")
    report = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "kernel": kernel,
              "compile": cfg.compile, "batch": [cfg.batch_size, model_cfg.seq_len], "routers": {}}
    for router in ("emo", "std"):
        twin = dataclasses.replace(model_cfg, router=router)
        seconds, first, raw = time_steps(twin, cfg, bench, device)
        tokens = cfg.batch_size * twin.seq_len
        mfu = raw.flops_per_token(twin.seq_len) * tokens / seconds / peak if peak else None
        total, active = raw.num_params()
        print(f"{router}: {seconds * 1000:.1f} ms/step | {tokens / seconds:,.0f} tok/s | "
              f"MFU {f'{mfu:.1%}' if mfu else '- (no peak FLOP/s known for this device)'} | first step "
              f"{first:.1f} s | {total / 1e6:.1f}M total, {active / 1e6:.1f}M active parameters")
        report["routers"][router] = {"ms_per_step": seconds * 1000, "tokens_per_s": tokens / seconds, "mfu": mfu,
                                     "first_step_s": first, "params": total, "active_params": active}
        del raw
    ratio = report["routers"]["emo"]["ms_per_step"] / report["routers"]["std"]["ms_per_step"]
    report["emo_over_std_step_time"] = ratio
    print(f"EMO / std step time: {ratio:.3f}")
    if bench.json:
        with open(bench.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
