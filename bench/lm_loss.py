"""
Peak memory and time of one training step of the LM loss (LM head + cross-entropy + z-loss, forward and
backward) at the release's vocabulary: the plain computation (all logits at once) against the chunked one of
lm_loss.py. Each is measured in a fresh process: its peak resident memory above what it held before the step.
Not a test.

    python bench/lm_loss.py                      # vocab 100352, width 256, 8192 tokens, float32 on the CPU
    python bench/lm_loss.py --tokens 16384 --width 512

Why lm_loss.py's chunks are what they are (LOGITS_PER_CHUNK), measured on the 2-core CPU, one forward and
backward: at vocabulary 4096 (emo_tiny) 4096-token chunks took 1.3-1.9x as long as 128-token ones; at
vocabulary 100,352, 16-token chunks took 3.2x as long as 128-token ones. Next-token accuracy is counted with
amax, not argmax: argmax was 14x slower on that CPU.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_loss import lm_loss, lm_loss_reference  # noqa: E402

FUNCTIONS = {"plain": lm_loss_reference, "chunked": lm_loss}


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name, tokens, width, vocab, repeats):
    """In this (fresh) process: extra peak memory of the first step, and the median time of the steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    before = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        x.grad = weight.grad = None
        start = time.perf_counter()
        loss, _, _, _ = FUNCTIONS[name](x, weight, targets, 1e-5)
        loss.backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            extra = peak_rss_bytes() - before
    return {"peak_extra_bytes": extra, "seconds": sorted(times)[len(times) // 2], "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.width, args.vocab, args.repeats)))
        return
    print(f"cpu ({torch.get_num_threads()} threads) | torch {torch.__version__} | {args.tokens} tokens x width "
          f"{args.width}, vocabulary {args.vocab}, float32 | one step = forward + backward")
    results = {}
    for name in FUNCTIONS:
        out = subprocess.run([sys.executable, __file__, "--measure", name, "--tokens", str(args.tokens), "--width",
                              str(args.width), "--vocab", str(args.vocab), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        results[name] = r = json.loads(out.strip().splitlines()[-1])
        print(f"  {name:<8} peak memory +{r['peak_extra_bytes'] / 2 ** 20:8.0f} MiB   {r['seconds'] * 1000:8.0f} ms   "
              f"loss {r['loss']:.6f}")
    plain, chunked = results["plain"], results["chunked"]
    print(f"chunked / plain: peak memory {chunked['peak_extra_bytes'] / plain['peak_extra_bytes']:.3f}, "
          f"time {chunked['seconds'] / plain['seconds']:.2f}")


if __name__ == "__main__":
    main()
