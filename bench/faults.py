"""
kill -9 at random moments, resume, and check that the run ends exactly where an uninterrupted one does.

    python bench/faults.py --trials 20          # prints how many of 20 interrupted runs resumed exactly

A tiny corpus (the tests' four domains) is built in a temporary folder and an uninterrupted reference run
trained (the tests' tiny model, 40 steps, a checkpoint every 2 steps, an evaluation every 5). Each trial starts
the same run in a fresh folder and kills it (SIGKILL) after a random delay, up to --kills times, each time
resuming from whatever the killed process left (from scratch if it left no checkpoint); the last resume runs to
the end. The trial is exact when every step's record in history.json and every tensor of ckpt.pt equal the
reference's. Not a test: it takes minutes (each process imports torch), and it is what docs/results.md cites.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.prepare import build_corpus  # noqa: E402
from tests.conftest import tiny_documents, tiny_run  # noqa: E402

STEPS = ["--max_steps=40", "--checkpoint_interval=2", "--eval_interval=5", "--log_interval=1"]


def command(data_dir, out_dir):
    """The training command line: resume when a checkpoint exists."""
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
    return [sys.executable, "train.py", *tiny_run(data_dir, out_dir, *STEPS, *resume)]


def run_to_the_end(data_dir, out_dir):
    subprocess.run(command(data_dir, out_dir), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def final_state(out_dir):
    """(every step's record, every tensor of the model) of a finished run."""
    with open(os.path.join(out_dir, "history.json")) as f:
        history = json.load(f)
    return history, torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]


def same(a, b):
    (history_a, model_a), (history_b, model_b) = a, b
    return history_a == history_b and model_a.keys() == model_b.keys() and \
        all(torch.equal(model_a[k], model_b[k]) for k in model_a)


def trial(data_dir, out_dir, kills, reference_seconds, rng):
    """Start, kill at random up to kills times, resume to the end; whether the end equals the reference and how
    many kills landed before the run ended by itself."""
    landed = 0
    for _ in range(kills):
        process = subprocess.Popen(command(data_dir, out_dir), cwd=ROOT, stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, reference_seconds))
        if process.poll() is None:
            process.kill()
            landed += 1
        process.wait()
    run_to_the_end(data_dir, out_dir)
    return landed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="kill -9 attempts per trial")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="nanoemo_faults_")
    data_dir = os.path.join(work, "corpus")
    build_corpus(tiny_documents(), data_dir, tokenizer="bpe", vocab_size=320, n_val=4, n_calib=3, seed=7)
    started = time.time()
    run_to_the_end(data_dir, os.path.join(work, "reference"))
    reference_seconds = time.time() - started
    reference = final_state(os.path.join(work, "reference"))
    exact, landed = 0, 0
    for t in range(args.trials):
        out_dir = os.path.join(work, f"trial{t}")
        landed += trial(data_dir, out_dir, args.kills, reference_seconds, rng)
        exact += same(final_state(out_dir), reference)
        print(f"trial {t + 1}: {'exact' if same(final_state(out_dir), reference) else 'DIFFERS'}", flush=True)
    print(f"{exact} of {args.trials} interrupted runs resumed exactly ({landed} kill -9s landed mid-run, "
          f"a run takes {reference_seconds:.1f} s uninterrupted; work folder {work})")


if __name__ == "__main__":
    main()
