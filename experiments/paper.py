"""
The paper's evidence beyond its retention figure, at toy size on the demo's models (docs/method.md says where
the toy differs from the release). Each experiment makes rows; experiments/report.py writes their tables.

    pruned        each domain pruned to 25% and 12.5% (greedy), as is ("inf") and fine-tuned ("ft", finetune.py)
    methods       the selection methods compared at 25% and 12.5% (the paper's Fig. 4)
    calibration   1, 4, 16 and all calibration examples, 3 calibration seeds, at 12.5%, with the overlap of the
                  kept sets (the paper's Appendix B.2)
    composition   the union of two domains' subsets at the budget of one and at the sum of both, evaluated on
                  both domains and a third; and every domain's 12.5% subset evaluated on every domain
Calibration examples are the release's kind (calibration.few_shot_calibration): a few-shot prompt of 2
demonstrations then a passage and its gold continuation, every token scored. The memory-matched baselines
trained from scratch (config/std_tiny_e8.py, std_tiny_e16.py, dense_tiny.py) are evaluated on every domain in
full. The knobs are PaperConfig's.

    python -m experiments.paper run --ckpt out/emo_tiny --out out/paper/emo_tiny     # one model's rows (a core each)
    python -m experiments.paper baselines --ckpt out/std_tiny_e8,out/std_tiny_e16,out/dense_tiny \
        --out out/paper/baselines
    python -m experiments.report --paper out/paper/emo_tiny,out/paper/std_tiny,out/paper/baselines \\
        --out results/tiny_cpu/paper
"""

import argparse
import copy
import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from calibration import domain_pool, few_shot_calibration
from checkpoint import checkpoint_paths, load_model, model_name
from data.corpus import Corpus
from errors import UserError, run_command
from eval import evaluate_text
from experiments.sweep import corpus_domains, evaluate_domain
from finetune import finetune
from prune import keep_count, prune_composed


@dataclass
class PaperConfig:
    fractions: tuple = (0.25, 0.125)  # fractions of the experts kept, largest first
    methods: tuple = ("greedy", "global", "frequency", "easy_ep", "random")
    calib_examples: int = 16  # calibration examples per domain, wherever the experiment does not vary them
    calibration_sizes: tuple = (1, 4, 16, 48)  # 48: every example the calibration documents give here ("all")
    calibration_seeds: tuple = (1, 2, 3)  # which passages; "all" takes seed 1 only
    finetune_examples: int = 64  # the fine-tuning pool of a domain (calibration.domain_pool)
    eval_tokens: int = 16384  # evaluation tokens per domain
    pairs: tuple = (("python", "c", "math"), ("math", "legal", "python"))  # two domains composed, and a third
    batch_size: int = 16
    device: str = "cpu"


def pruned(model, calibrations, fraction, method="greedy", compose="union"):
    """A pruned copy of model (for one or several domains) and its per-layer records."""
    copied = copy.deepcopy(model)
    keep = keep_count(fraction, model.cfg.n_experts, model.cfg.n_shared)
    return copied, prune_composed(copied, calibrations, keep, method, compose=compose)


def row(experiment, name, model, domain, fraction, result, **extra):
    """One result: the experiment, the model (name, and its experts before pruning), the domain, the fraction
    kept, what the experiment varied (extra) and the evaluation."""
    return {"experiment": experiment, "model": name, "model_experts": model.cfg.n_experts, "domain": domain,
            "fraction": fraction, **extra, **result}


def evaluate(model, domain, cfg):
    return evaluate_domain(model, domain, cfg.batch_size, torch.device(cfg.device))


def pruned_rows(name, model, corpus, domains, cfg):
    """Each domain pruned to each fraction, as is and fine-tuned; the full model as the reference."""
    rows = []
    for d in tqdm(domains, desc=f"{name}: pruned, as is and fine-tuned"):
        rows.append(row("pruned", name, model, d.name, 1.0, evaluate(model, d, cfg), variant="full"))
        for fraction in cfg.fractions:
            small, _ = pruned(model, [few_shot_calibration(corpus, d.name, cfg.calib_examples)], fraction)
            rows.append(row("pruned", name, model, d.name, fraction, evaluate(small, d, cfg), variant="inf"))
            small, _ = finetune(small, domain_pool(corpus, d.name, cfg.finetune_examples))
            rows.append(row("pruned", name, model, d.name, fraction, evaluate(small, d, cfg), variant="ft"))
    return rows


def method_rows(name, model, corpus, domains, cfg):
    rows = []
    for d in tqdm(domains, desc=f"{name}: selection methods"):
        for fraction in cfg.fractions:
            for method in cfg.methods:
                small, _ = pruned(model, [few_shot_calibration(corpus, d.name, cfg.calib_examples)], fraction, method)
                rows.append(row("methods", name, model, d.name, fraction, evaluate(small, d, cfg), method=method))
    return rows


def jaccard(a, b):
    """Mean over layers of |a & b| / |a | b| of two pruning records' kept sets."""
    return sum(len(set(x["kept"]) & set(y["kept"])) / len(set(x["kept"]) | set(y["kept"]))
               for x, y in zip(a, b)) / len(a)


def calibration_rows(name, model, corpus, domains, cfg):
    """Pruned to the smallest fraction with each calibration size (every seed but for 'all', the largest),
    with each kept set's overlap with the one 'all' gives."""
    fraction, everything, rows = cfg.fractions[-1], cfg.calibration_sizes[-1], []
    for d in tqdm(domains, desc=f"{name}: calibration sizes"):
        _, reference_layers = pruned(model, [few_shot_calibration(corpus, d.name, everything)], fraction)
        for size in cfg.calibration_sizes:
            for seed in cfg.calibration_seeds if size < everything else cfg.calibration_seeds[:1]:
                small, layers = pruned(model, [few_shot_calibration(corpus, d.name, size, seed)], fraction)
                rows.append(row("calibration", name, model, d.name, fraction, evaluate(small, d, cfg),
                                examples=size, seed=seed, overlap_with_all=jaccard(layers, reference_layers)))
    return rows


def parse_pairs(spec):
    """'python+c:math,...' -> ((first, second, third), ...): two domains to compose and a third."""
    pairs = []
    for part in spec.split(","):
        composed, _, third = part.partition(":")
        first, _, second = composed.partition("+")
        if not (first and second and third):
            raise UserError(f"--pairs {spec!r}: give FIRST+SECOND:THIRD,...")
        pairs.append((first, second, third))
    return tuple(pairs)


def composition_rows(name, model, corpus, domains, cfg):
    """Two domains composed at the smallest fraction (union at the sum of budgets, mean score at one budget),
    evaluated on both and a third; then every domain's subset on every domain (loss)."""
    by_name = {d.name: d for d in domains}
    fraction, n, rows = cfg.fractions[-1], cfg.calib_examples, []
    for first, second, third in cfg.pairs:
        for compose in ("union", "mean"):
            calibrations = [few_shot_calibration(corpus, first, n), few_shot_calibration(corpus, second, n)]
            small, _ = pruned(model, calibrations, fraction, compose=compose)
            for target in (first, second, third):
                rows.append(row("composition", name, model, target, fraction, evaluate(small, by_name[target], cfg),
                                subset=f"{first}+{second}", compose=compose,
                                experts=sum(small.cfg.layer_experts()) / small.cfg.n_layer))
    for d in tqdm(domains, desc=f"{name}: each subset on every domain"):
        small, _ = pruned(model, [few_shot_calibration(corpus, d.name, n)], fraction)
        for target in domains:
            result = evaluate_text(small, target.tokens, cfg.batch_size, torch.device(cfg.device))
            rows.append(row("cross", name, model, target.name, fraction, result, subset=d.name))
    return rows


def baseline_rows(name, model, domains, cfg):
    return [row("baseline", name, model, d.name, 1.0, evaluate(model, d, cfg), experts=model.cfg.n_experts)
            for d in domains]


EXPERIMENTS = (pruned_rows, method_rows, calibration_rows, composition_rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("run", "baselines"))
    parser.add_argument("--ckpt", dest="paths", type=checkpoint_paths, required=True,
                        help="checkpoints, comma-separated")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--keep", dest="fractions", type=lambda t: tuple(float(f) for f in t.split(",")),
                        default=PaperConfig.fractions, help="fractions of the experts kept, largest first")
    parser.add_argument("--pairs", type=parse_pairs, default=PaperConfig.pairs, help="composition: A+B:C,...")
    parser.add_argument("--batch_size", type=int, default=PaperConfig.batch_size)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = PaperConfig(fractions=args.fractions, pairs=args.pairs, batch_size=args.batch_size, device=args.device)
    corpus = Corpus(args.data_dir)
    domains = corpus_domains(corpus, cfg.calib_examples, cfg.eval_tokens)
    rows = []
    for path in args.paths:
        model, _ = load_model(path, cfg.device)
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        name = model_name(path)
        if args.step == "baselines":
            rows += baseline_rows(name, model, domains, cfg)
            continue
        for experiment in EXPERIMENTS:
            rows += experiment(name, model, corpus, domains, cfg)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}/rows.json")


if __name__ == "__main__":
    run_command(main)
