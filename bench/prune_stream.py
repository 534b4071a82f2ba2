"""
Streamed pruning at the release's size: a random checkpoint of the release's exact shapes (emo_full: 16 layers of
128 experts, d 2048, bf16 safetensors, one shard per layer, ~27 GB written here a layer at a time), pruned to 12.5%
by prune_stream.py with 16 calibration sequences of 1,024 tokens, in a fresh process: its peak memory and wall
time. Then the same at 2 layers for prune_stream.py and for the in-memory path (load_hf + prune.py's greedy), for
the ratio. Memory is sampled from /proc/self/status: the resident set (VmHWM, which also counts the pages of the
memory-mapped files the process has read) and the anonymous memory it owns (RssAnon, its peak). Not a test.

    python bench/prune_stream.py --folder /tmp/release_random        # writes it first if absent (~27 GB)
    python bench/prune_stream.py --folder /tmp/release_random --layers 2 --skip_full
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from hf import OUTSIDE_LAYERS, block_tensors, write_metadata  # noqa: E402
from model import Block, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def release_config(n_layer):
    (_, cfg), _ = parse_args([os.path.join(ROOT, "config/emo_full.py"), f"--n_layer={n_layer}"], TrainConfig,
                             ModelConfig)
    return cfg


@torch.no_grad()
def write_random_release(folder, n_layer):
    """A random bf16 checkpoint of the release's shapes, written a layer at a time (never the whole model)."""
    cfg = release_config(n_layer)
    os.makedirs(folder, exist_ok=True)
    n_files, weight_map = n_layer + 1, {}
    for i in range(n_layer):
        with torch.device("meta"):
            block = Block(cfg, cfg.n_experts)
        block.to_empty(device="cpu").to(torch.bfloat16)
        for name, p in block.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, cfg.init_std)
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        shard = block_tensors(block, i, torch.bfloat16)
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del block, shard
    shapes = {"embed.weight": (cfg.vocab_size, cfg.d_model), "lm_head.weight": (cfg.vocab_size, cfg.d_model),
              "norm.weight": (cfg.d_model,)}
    outside = {hf: torch.randn(shapes[ours]).mul_(cfg.init_std).bfloat16() for hf, ours in OUTSIDE_LAYERS}
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(outside, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in outside})
    write_metadata(folder, cfg, torch.bfloat16, weight_map)


def memory_sampler(peaks, stop):
    """Record the peaks of VmHWM and RssAnon (bytes) of this process until stop is set."""
    while not stop.is_set():
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        for key in ("VmHWM", "RssAnon"):
            peaks[key] = max(peaks.get(key, 0), int(status[key].split()[0]) * 1024)
        time.sleep(0.1)


def measure(mode, folder, tokens, n_sequences):
    """Run one pruning in this process: mode 'stream' or 'memory'; prints a JSON line of its figures."""
    import prune
    import prune_stream
    from hf import load_hf
    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=memory_sampler, args=(peaks, stop), daemon=True)
    sampler.start()
    g = torch.Generator().manual_seed(0)
    cfg = prune_stream.HFLayers(folder).cfg
    idx = torch.randint(0, 100257, (n_sequences, tokens), generator=g)
    batches = [(part, torch.ones_like(part, dtype=torch.bool)) for part in idx.split(4)]  # 4 sequences a pass
    keep = round(0.125 * cfg.n_experts)
    started = time.time()
    if mode == "stream":
        out = folder.rstrip("/") + "_pruned.tmp"
        os.makedirs(out, exist_ok=True)
        _, layers, _ = prune_stream.stream_prune(prune_stream.HFLayers(folder), batches, keep, out)
    else:
        model = load_hf(folder, dtype=torch.float32)
        layers = prune.prune(model, batches, keep, "greedy")
    seconds = time.time() - started
    stop.set()
    sampler.join()
    print(json.dumps({"mode": mode, "layers": cfg.n_layer, "seconds": seconds, "peak_rss": peaks["VmHWM"],
                      "peak_anon": peaks["RssAnon"], "kept": [layer["kept"] for layer in layers]}))


def run(mode, folder, args):
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--folder", folder, "--tokens",
                          str(args.tokens), "--sequences", str(args.sequences)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/release_random")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--skip_full", action="store_true", help="only the 2-layer comparison")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.folder, args.tokens, args.sequences)
    gib = 2 ** 30
    small = args.folder.rstrip("/") + "_2layers"
    for folder, n_layer in ((small, 2), (args.folder, 16)):
        if not os.path.exists(os.path.join(folder, "config.json")) and (n_layer == 2 or not args.skip_full):
            started = time.time()
            write_random_release(folder, n_layer)
            print(f"wrote a random {n_layer}-layer checkpoint of the release's shapes in {time.time() - started:.0f} s")
    results = {"stream_2": run("stream", small, args), "memory_2": run("memory", small, args)}
    if not args.skip_full:
        results["stream_16"] = run("stream", args.folder, args)
    for name, r in results.items():
        print(f"{name}: {r['seconds']:.0f} s, peak resident {r['peak_rss'] / gib:.2f} GiB (anonymous "
              f"{r['peak_anon'] / gib:.2f} GiB)")
    s, m = results["stream_2"], results["memory_2"]
    print(f"2 layers, streamed / in memory: time {s['seconds'] / m['seconds']:.2f}x, peak resident "
          f"{s['peak_rss'] / m['peak_rss']:.2f}x, anonymous {s['peak_anon'] / m['peak_anon']:.2f}x; the same kept "
          f"sets: {s['kept'] == m['kept']}")


if __name__ == "__main__":
    main()
