"""
Peak memory and time of loading the release's 1B/14B architecture from Hugging Face safetensors. A random
checkpoint of the same shapes but 1 and 2 layers is written in bfloat16, each loaded in a fresh process;
memory and time grow linearly with layers, so the two give the 16-layer figures. Not a test.

    python bench/hf_load.py --dir /tmp/hf_bench        # needs ~7 GB of disk and ~12 GB of memory
"""

import argparse
import dataclasses
import json
import os
import resource
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


def write_random(folder, n_layer):
    (_, cfg), _ = parse_args([os.path.join(ROOT, "config/emo_full.py")], TrainConfig, ModelConfig)
    with torch.device("meta"):
        model = EMO(dataclasses.replace(cfg, n_layer=n_layer))
    model.to(torch.bfloat16).to_empty(device="cpu")
    model.init_weights()
    export_hf(model, folder, torch.bfloat16)


def resident_gib(field):
    """RssAnon (memory the process owns) or RssFile (pages of mapped files, which the kernel can drop)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2 ** 20


def measure(folder):
    """Run in a fresh process: load, then report seconds and memory. Peak RSS also counts the pages of the
    memory-mapped safetensors files (page cache the kernel can drop); RssAnon is what the process holds."""
    start = time.perf_counter()
    model = load_hf(folder)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      "anon_gib": resident_gib("RssAnon"), "file_gib": resident_gib("RssFile"), "params": params,
                      "model_gib": params * 2 / 2 ** 30}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/hf_bench")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    results = {}
    for n_layer in (1, 2):
        folder = os.path.join(args.dir, f"layers{n_layer}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            write_random(folder, n_layer)
        out = subprocess.run([sys.executable, __file__, "--measure", folder], capture_output=True, text=True,
                             check=True).stdout
        results[n_layer] = json.loads(out.strip().splitlines()[-1])
        r = results[n_layer]
        print(f"{n_layer} layer(s): {r['params'] / 1e9:.2f}B parameters ({r['model_gib']:.1f} GiB bf16) loaded in "
              f"{r['seconds']:.1f} s; peak RSS {r['peak_gib']:.1f} GiB, of which the process owns "
              f"{r['anon_gib']:.1f} GiB and {r['file_gib']:.1f} GiB are mapped file pages")
    e = {k: results[1][k] + 15 * (results[2][k] - results[1][k])
         for k in ("seconds", "peak_gib", "anon_gib", "params", "model_gib")}
    print(f"16 layers (extrapolated): {e['params'] / 1e9:.2f}B parameters ({e['model_gib']:.1f} GiB bf16), load "
          f"{e['seconds']:.0f} s; memory owned {e['anon_gib']:.1f} GiB = {e['anon_gib'] / e['model_gib']:.2f}x the "
          f"model, peak RSS with mapped file pages {e['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
