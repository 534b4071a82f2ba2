"""
Peak memory and time of loading the release's architecture from Hugging Face safetensors, against the bytes of
the weights themselves: a random checkpoint of the release's shapes (emo_full: d 2048, 128 experts of hidden
1024, vocabulary 100,352) with 2 layers, and the release pruned to 12.5% (16 of 128 experts, 16 layers), written
in bfloat16, each loaded in a fresh process in bfloat16 (the folder's dtype) and in float32. Loading maps each
file only for each tensor's read (hf.TensorFiles): the target is a peak resident set of at most 1.1x the
weights' bytes in the dtype asked for. Not a test.

    python bench/hf_load.py --dir /tmp/hf_bench        # needs ~9 GB of disk and ~10 GB of memory
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from hf import export_hf, load_hf  # noqa: E402
from model import EMO, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"release, 2 layers": {"n_layer": 2}, "release pruned to 12.5%": {"n_experts": 16}}


def write_random(folder, overrides):
    (_, cfg), _ = parse_args([os.path.join(ROOT, "config/emo_full.py")], TrainConfig, ModelConfig)
    with torch.device("meta"):
        model = EMO(dataclasses.replace(cfg, **overrides))
    model.to(torch.bfloat16).to_empty(device="cpu")
    model.init_weights()
    export_hf(model, folder, torch.bfloat16)


def peak_resident():
    """This process's peak resident set in bytes (VmHWM). Not getrusage's ru_maxrss: that one keeps, across
    fork and exec, the resident set the parent had when it started the child (here the writer's model)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(folder, dtype):
    """Run in a fresh process: load, then report seconds, peak resident set and the weights' bytes."""
    start = time.perf_counter()
    model = load_hf(folder, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": peak_resident(), "weights": weights}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/hf_bench")
    parser.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)  # the child: folder, dtype
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)
    for i, (name, overrides) in enumerate(SHAPES.items()):
        folder = os.path.join(args.dir, f"shape{i}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            write_random(folder, overrides)
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, __file__, "--measure", folder, dtype], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name}, {dtype}: weights {r['weights'] / 2 ** 30:.2f} GiB, loaded in {r['seconds']:.1f} s, peak "
                  f"resident set {r['peak'] / 2 ** 30:.2f} GiB = {r['peak'] / r['weights']:.2f}x the weights")


if __name__ == "__main__":
    main()
