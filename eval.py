"""
Per-domain quality of a model on held-out text: loss, perplexity and next-token accuracy, in eval mode (token
by token routing, no pool, as the release does at inference). The paper's experiment, which prunes and
evaluates every domain at every fraction of experts kept, is experiments/sweep.py.

    python eval.py --ckpt out/emo_tiny                                  # the built-in corpus's domains
    python eval.py --ckpt out/pruned/emo_tiny/python-keep8-greedy.pt
    python eval.py --ckpt out/emo_tiny --data my_eval/                  # your own text (data/user.py)
    python eval.py --ckpt out/emo_tiny,out/std_tiny --data notes=my_notes/,code=src/
    python eval.py --ckpt allenai/Emo_1b14b_1T --benchmark mmlu_stem,arc_easy   # the paper's benchmarks
    python eval.py --ckpt allenai/Emo_1b14b_1T --benchmark mmlu_cats --protocol emo    # the paper's Table 3

Evaluation text is laid back to back (each document closed by its EOS) and cut into windows of seq_len + 1
tokens, every token predicted once; the last window is padded and its padding ignored; tokens that are not
scored (the prompt of a prompt/answer example) are context only.
"""

import argparse
import dataclasses
import json
import math

import numpy as np
import torch
import torch.distributed as dist

from benchmarks import PROTOCOLS, parse_benchmarks, score_benchmark
from checkpoint import checkpoint_paths, checkpoint_tokenizer, load_model, model_name
from data.corpus import Corpus
from data.user import evaluation_text, named_paths
from errors import UserError, run_command
from model import eval_mode


def set_pool_eval(model, pool_eval):
    """Route in eval mode with pools of pool_eval experts per document (0: token by token, as the release at
    inference), as the release's in-loop evaluator does (pools of 32 of 128). Returns the model."""
    if not 0 <= pool_eval <= max(model.cfg.layer_experts()):
        raise UserError(f"--pool_eval {pool_eval}: give 0 (token routing) up to the {model.cfg.n_experts} experts")
    model.cfg = dataclasses.replace(model.cfg, pool_eval=pool_eval)
    for block in model.layers:
        block.moe.router.pool_eval = pool_eval
    return model


def domain_windows(tokens, seq_len, max_tokens, scored=None):
    """(n,) tokens -> inputs and targets (W, T) int64, at most max_tokens targets; targets -1 where padding
    or where the target token is not scored (scored (n,) bool, None: all)."""
    tokens = np.asarray(tokens[:max_tokens + 1], dtype=np.int64)
    targets = tokens.copy()
    if scored is not None:
        targets[~np.asarray(scored[:max_tokens + 1], dtype=bool)] = -1
    n_targets = len(tokens) - 1
    n_windows = math.ceil(n_targets / seq_len)
    x = np.zeros((n_windows, seq_len), dtype=np.int64)
    y = np.full((n_windows, seq_len), -1, dtype=np.int64)
    for w in range(n_windows):
        start, end = w * seq_len, min((w + 1) * seq_len, n_targets)
        x[w, :end - start] = tokens[start:end]
        y[w, :end - start] = targets[start + 1:end + 1]
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def evaluate_windows(model, x, y, batch_size, device, autocast_dtype=torch.float32):
    """Summed loss, correct predictions and scored tokens over windows (W, T), as a tensor of 3.
    Under torch.distributed the windows are shared out and the sums all-reduced; every rank runs the same
    number of forward passes (empty batches where it has none left), as FSDP needs."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n_batches = math.ceil(len(x) / (batch_size * world))
    with eval_mode(model):
        for b in range(n_batches):
            rows = slice((b * world + rank) * batch_size, (b * world + rank + 1) * batch_size)
            xb, yb = x[rows].to(device), y[rows].to(device)
            if len(xb) == 0:  # nothing left for this rank: a dummy pass with nothing scored
                xb, yb = x[:1].to(device), torch.full_like(x[:1], -1).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                _, stats = model(xb, yb)  # the loss a chunk of logits at a time (lm_loss.py)
            scored = (yb != -1).sum().double()
            sums += torch.stack([stats["lm_loss"].double() * scored, stats["lm_correct"].double(), scored])
    if world > 1:
        dist.all_reduce(sums)
    return sums


def summarize(sums):
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": correct / max(count, 1),
            "tokens": int(count)}


def evaluate_text(model, tokens, batch_size, device, scored=None, max_tokens=None, autocast_dtype=torch.float32):
    """{loss, perplexity, accuracy, tokens} of model on text tokens (n,) (scored (n,) bool, None: all)."""
    x, y = domain_windows(tokens, model.cfg.seq_len, max_tokens or len(tokens), scored)
    return summarize(evaluate_windows(model, x, y, batch_size, device, autocast_dtype))


def evaluate_domains(model, corpus, split, batch_size, max_tokens, device, autocast_dtype=torch.float32):
    """{domain: {loss, perplexity, accuracy, tokens}} on the first max_tokens tokens of each domain's split."""
    return {domain: evaluate_text(model, corpus.domain_tokens(split, domain), batch_size, device,
                                  max_tokens=max_tokens, autocast_dtype=autocast_dtype)
            for domain in corpus.domains}


def print_results(name, model, results):
    print(f"{name}: {model.cfg.n_experts} experts, top {model.cfg.top_k}")
    print(f"{'domain':<12}{'loss':>8}{'ppl':>10}{'accuracy':>10}{'tokens':>9}")
    for domain, r in results.items():
        print(f"{domain:<12}{r['loss']:>8.3f}{r['perplexity']:>10.2f}{r['accuracy']:>10.1%}{r['tokens']:>9}")


def print_benchmark_results(name, model, results):
    """A line per benchmark (and per part of one, indented), the protocol and its primary metric named."""
    print(f"{name}: {model.cfg.n_experts} experts, top {model.cfg.top_k}")
    print(f"{'benchmark':<36}{'protocol':>9}{'primary':>14}{'acc_raw':>9}{'acc_per_char':>14}{'acc_uncond':>12}"
          f"{'questions':>11}")

    def line(label, r, protocol="", primary=""):
        uncond = f"{r['acc_uncond']:.1%}" if "acc_uncond" in r else "-"
        print(f"{label:<36}{protocol:>9}{primary:>14}{r['acc_raw']:>9.1%}{r['acc_per_char']:>14.1%}{uncond:>12}"
              f"{r['n']:>11}")
    for benchmark, r in results.items():
        line(benchmark, r, r["protocol"], f"{r['primary']} {r[r['primary']]:.1%}")
        for label, part in r.get("parts", {}).items():
            line("  " + label, part)


def evaluate(model, ckpt, path, args, benchmarks, corpus, device):
    """One model's results: {benchmark: accuracies} for --benchmark, else {domain: loss...} of the corpus or
    --data."""
    if corpus is not None:
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        return evaluate_domains(model, corpus, "val", args.batch_size, args.max_tokens, device)
    encoding = checkpoint_tokenizer(ckpt.get("tokenizer"), args.tokenizer, path)
    if benchmarks:
        return {name: score_benchmark(model, encoding, name, args.batch_size, device, args.limit, args.protocol)
                for name in benchmarks}
    results = {}
    for domain, data_path in named_paths(args.data, "--data").items():
        tokens, scored, _ = evaluation_text(data_path, encoding, model.cfg)
        results[domain] = evaluate_text(model, tokens, args.batch_size, device, scored, args.max_tokens)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--init_from", dest="paths", type=checkpoint_paths, required=True,
                        help="checkpoint(s), comma-separated: files, run directories, Hugging Face folders or hub ids")
    parser.add_argument("--data_dir", default="data/multidomain", help="the built-in corpus")
    parser.add_argument("--data", default="", help="your own evaluation text: PATH, or NAME=PATH,...")
    parser.add_argument("--benchmark", default="", help="benchmarks instead of text, comma-separated "
                        "(a wrong name lists them)")
    parser.add_argument("--protocol", default="nanoemo", choices=PROTOCOLS, help="--benchmark: which questions are "
                        "scored and how (benchmarks.py): nanoemo, the EMO paper's, or OLMES's")
    parser.add_argument("--limit", type=int, default=0, help="--benchmark: score only the first LIMIT questions "
                        "of each")
    parser.add_argument("--tokenizer", default="", help="for --data or --benchmark when the checkpoint records none")
    parser.add_argument("--max_tokens", type=int, default=16384, help="evaluation tokens per domain")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--pool_eval", type=int, default=None, help="route with pools of this many experts per "
                        "document, as the release's in-loop evaluator (0: token by token, as at inference; default: "
                        "the model's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="also write the results here as JSON: {model: {benchmark or "
                        "domain: ...}}")
    args = parser.parse_args(argv)
    if args.benchmark and args.data:
        raise UserError("give --data (text to score) or --benchmark (benchmarks), not both")
    if args.limit < 0:
        raise UserError(f"--limit {args.limit}: give a number of questions, or 0 for all")
    if args.max_tokens < 1 or args.batch_size < 1:
        raise UserError(f"--max_tokens {args.max_tokens} and --batch_size {args.batch_size} must be at least 1")
    device = torch.device(args.device)
    benchmarks = parse_benchmarks(args.benchmark) if args.benchmark else []
    corpus = None if args.data or benchmarks else Corpus(args.data_dir)
    everything = {}
    for path in args.paths:
        model, ckpt = load_model(path, device)
        if args.pool_eval is not None:
            set_pool_eval(model, args.pool_eval)
        results = evaluate(model, ckpt, path, args, benchmarks, corpus, device)
        (print_benchmark_results if benchmarks else print_results)(model_name(path), model, results)
        everything[model_name(path)] = results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    run_command(main)
