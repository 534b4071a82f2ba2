"""
The paper's evidence beyond its retention figure, at toy size on the demo's models and their seed-7 twins
(docs/method.md says where the toy differs from the release). Each experiment makes rows; experiments/report.py
writes their tables (mean and half the range over the seeds where there are two).

    pruned        each domain pruned to 25%, 12.5% and 6.25% (greedy), as is ("inf") and fine-tuned ("ft": the
                  release's fine-tune on the selection examples, finetune.py); the full model as the reference
    merge         at 12.5%: the fine-tuned subset merged back into the full model (finetune.merge_back), on its
                  domain and on the others (the paper's section 6)
    methods       the selection methods compared at 50%, 25% and 12.5% (the paper's Fig. 4)
    calibration   1, 4, 16 and all calibration examples at 12.5%, 3 seeds that draw the documents and the
                  passages, with the overlap of the kept sets; and 16 examples without a few-shot prompt (the
                  paper's Appendix B.2)
    composition   this project's extension: the union of two domains' subsets at the budget of one and at the
                  sum of both, evaluated on both domains and a third; and every domain's 12.5% subset on every
                  domain (the paper's cross-domain table)
    baselines     the memory-matched models trained from scratch (config/std_tiny_e16.py, std_tiny_e8.py,
                  dense_tiny.py), as they are and fine-tuned as the subsets are
    retention     the twins (config/emo_tiny_fixed.py: pools of a fixed 16; emo_tiny_noshared.py: no shared
                  expert; EMO-anneal: the standard MoE's last 5% of steps with the pool objective) pruned to
                  100-6.25%, routing token by token and with pools of a quarter of the experts
Calibration examples are the release's kind (calibration.few_shot_calibration): a few-shot prompt of 2
demonstrations then a passage and its gold continuation, every token scored. The knobs are PaperConfig's.

    python -m experiments.paper run --ckpt out/emo_tiny --out out/paper/emo_tiny     # every experiment of a model
    python -m experiments.paper run --ckpt out/emo_tiny_seed7 --only pruned,merge --out out/paper/emo_tiny_seed7
    python -m experiments.paper baselines --ckpt out/std_tiny_e8,out/std_tiny_e16,out/dense_tiny --out out/paper/b
    python -m experiments.paper retention --ckpt out/emo_tiny_fixed,out/emo_anneal_tiny --out out/paper/twins
    python -m experiments.report --paper out/paper/emo_tiny,out/paper/std_tiny,out/paper/b --out results/tiny_cpu/paper
"""

import argparse
import copy
import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from calibration import few_shot_calibration
from checkpoint import checkpoint_paths, load_model, model_name
from data.corpus import Corpus
from errors import UserError, run_command
from eval import evaluate_text, set_pool_eval
from experiments.sweep import corpus_domains, evaluate_domain, fraction_list
from finetune import FinetuneConfig, finetune, merge_back
from prune import keep_count, prune_composed


@dataclass
class PaperConfig:
    fractions: tuple = (0.25, 0.125, 0.0625)  # pruned as is and fine-tuned, largest first
    method_fractions: tuple = (0.5, 0.25, 0.125)
    smallest: float = 0.125  # calibration size, composition, merging
    methods: tuple = ("greedy", "global", "frequency", "easy_ep", "random")
    calib_examples: int = 16  # selection (and fine-tuning) examples per domain, wherever not varied
    calibration_sizes: tuple = (1, 4, 16, 48)  # 48: every example the calibration documents give here ("all")
    calibration_seeds: tuple = (1, 2, 3)  # which documents and passages; "all" takes seed 1 only
    zero_shot: int = 0  # the selection examples' few-shot prompt in the shots arm (the others have 2)
    finetune_batch: int = 4  # the release's 32, scaled to a pool of 16 selection examples: 4 steps of one epoch
    retention_fractions: tuple = (1.0, 0.5, 0.25, 0.125, 0.0625)
    pool_eval: int = 16  # the twins also evaluated with pools of a quarter of the 64 experts
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
    return {"experiment": experiment, "model": name, "model_experts": model.cfg.n_experts,
            "model_top_k": model.cfg.top_k, "domain": domain, "fraction": fraction, **extra, **result}


def evaluate(model, domain, cfg):
    return evaluate_domain(model, domain, cfg.batch_size, torch.device(cfg.device))


def fine_tuned(model, corpus, domain, cfg):
    """model fine-tuned as the release does after pruning, on the domain's selection examples (answers scored)."""
    examples = few_shot_calibration(corpus, domain, cfg.calib_examples, answers_only=True)
    return finetune(model, examples, FinetuneConfig(batch_size=cfg.finetune_batch))[0]


def pruned_rows(name, model, corpus, domains, cfg):
    """Each domain pruned to each fraction, as is and fine-tuned; the full model as the reference. At the
    smallest fraction (merge rows) the fine-tuned subset merged back, on its domain and on every other."""
    rows = []
    for d in tqdm(domains, desc=f"{name}: pruned, as is, fine-tuned, merged back"):
        rows.append(row("pruned", name, model, d.name, 1.0, evaluate(model, d, cfg), variant="full"))
        for fraction in cfg.fractions:
            small, layers = pruned(model, [few_shot_calibration(corpus, d.name, cfg.calib_examples)], fraction)
            rows.append(row("pruned", name, model, d.name, fraction, evaluate(small, d, cfg), variant="inf"))
            small = fine_tuned(small, corpus, d.name, cfg)
            rows.append(row("pruned", name, model, d.name, fraction, evaluate(small, d, cfg), variant="ft"))
            if fraction == cfg.smallest:
                merged = copy.deepcopy(model)
                merge_back(merged, small, [layer["kept"] for layer in layers])
                rows += [row("merge", name, model, target.name, fraction, evaluate(merged, target, cfg),
                             subset=d.name) for target in domains]
    return rows


def method_rows(name, model, corpus, domains, cfg):
    rows = []
    for d in tqdm(domains, desc=f"{name}: selection methods"):
        for fraction in cfg.method_fractions:
            for method in cfg.methods:
                small, _ = pruned(model, [few_shot_calibration(corpus, d.name, cfg.calib_examples)], fraction, method)
                rows.append(row("methods", name, model, d.name, fraction, evaluate(small, d, cfg), method=method))
    return rows


def jaccard(a, b):
    """Mean over layers of |a & b| / |a | b| of two pruning records' kept sets."""
    return sum(len(set(x["kept"]) & set(y["kept"])) / len(set(x["kept"]) | set(y["kept"]))
               for x, y in zip(a, b)) / len(a)


def calibration_rows(name, model, corpus, domains, cfg):
    """Pruned to the smallest fraction with each calibration size (every seed, each drawing documents and
    passages, but for 'all', the largest), with each kept set's overlap with the one 'all' gives; and with the
    examples of 16 without their few-shot prompt (shots 0)."""
    fraction, everything, rows = cfg.smallest, cfg.calibration_sizes[-1], []
    for d in tqdm(domains, desc=f"{name}: calibration sizes"):
        _, reference_layers = pruned(model, [few_shot_calibration(corpus, d.name, everything)], fraction)
        arms = [(size, seed, 2) for size in cfg.calibration_sizes
                for seed in (cfg.calibration_seeds if size < everything else cfg.calibration_seeds[:1])]
        arms += [(cfg.calib_examples, seed, cfg.zero_shot) for seed in cfg.calibration_seeds]
        for size, seed, shots in arms:
            examples = few_shot_calibration(corpus, d.name, size, seed, shots, shuffle_documents=size < everything)
            small, layers = pruned(model, [examples], fraction)
            rows.append(row("calibration", name, model, d.name, fraction, evaluate(small, d, cfg), examples=size,
                            calibration_seed=seed, shots=shots, overlap_with_all=jaccard(layers, reference_layers)))
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
    fraction, n, rows = cfg.smallest, cfg.calib_examples, []
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


def baseline_rows(name, model, corpus, domains, cfg):
    """A model trained from scratch on every domain, as it is and fine-tuned as the subsets are."""
    return [row("baseline", name, model, d.name, 1.0, evaluate(m, d, cfg), experts=model.cfg.n_experts,
                variant=variant)
            for d in domains for variant, m in (("inf", model), ("ft", fine_tuned(copy.deepcopy(model), corpus,
                                                                                 d.name, cfg)))]


def retention_rows(name, model, corpus, domains, cfg):
    """Pruned for each domain to each retention fraction, evaluated routing token by token and with pools of
    cfg.pool_eval experts per document."""
    rows = []
    for d in tqdm(domains, desc=f"{name}: retention"):
        examples = few_shot_calibration(corpus, d.name, cfg.calib_examples)
        for fraction in cfg.retention_fractions:
            small = pruned(model, [examples], fraction)[0] if fraction < 1 else copy.deepcopy(model)
            for pools in (0, cfg.pool_eval):
                result = evaluate(set_pool_eval(small, min(pools, small.cfg.n_experts - small.cfg.n_shared)), d, cfg)
                rows.append(row("retention", name, model, d.name, fraction, result, pool_eval=pools))
    return rows


EXPERIMENTS = {"pruned": pruned_rows, "methods": method_rows, "calibration": calibration_rows,
               "composition": composition_rows}
STEPS = {"baselines": baseline_rows, "retention": retention_rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("run", *STEPS))
    parser.add_argument("--ckpt", dest="paths", type=checkpoint_paths, required=True,
                        help="checkpoints, comma-separated")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="run: the experiments, comma-separated")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--pairs", type=parse_pairs, default=PaperConfig.pairs, help="composition: A+B:C,...")
    parser.add_argument("--fractions", type=fraction_list, default=PaperConfig.fractions, help="pruned: kept fractions")
    parser.add_argument("--method_fractions", type=fraction_list, default=PaperConfig.method_fractions)
    parser.add_argument("--retention_fractions", type=fraction_list, default=PaperConfig.retention_fractions)
    parser.add_argument("--smallest", type=float, default=PaperConfig.smallest, help="calibration, composition, merge")
    parser.add_argument("--pool_eval", type=int, default=PaperConfig.pool_eval, help="retention: pools of this many")
    parser.add_argument("--batch_size", type=int, default=PaperConfig.batch_size)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(EXPERIMENTS)
    if unknown:
        raise UserError(f"--only {args.only}: no experiment {', '.join(sorted(unknown))}; they are "
                        f"{', '.join(EXPERIMENTS)}")
    cfg = PaperConfig(fractions=args.fractions, method_fractions=args.method_fractions,
                      retention_fractions=args.retention_fractions, smallest=args.smallest, pool_eval=args.pool_eval,
                      pairs=args.pairs, batch_size=args.batch_size, device=args.device)
    if cfg.smallest not in cfg.fractions:
        raise UserError(f"--smallest {cfg.smallest}: give one of --fractions {cfg.fractions} (merging is done there)")
    corpus = Corpus(args.data_dir)
    domains = corpus_domains(corpus, cfg.calib_examples, cfg.eval_tokens)
    rows = []
    for path in args.paths:
        model, _ = load_model(path, cfg.device)
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        name = model_name(path)
        if args.step in STEPS:
            rows += STEPS[args.step](name, model, corpus, domains, cfg)
            continue
        for experiment in args.only.split(","):
            rows += EXPERIMENTS[experiment](name, model, corpus, domains, cfg)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}/rows.json")


if __name__ == "__main__":
    run_command(main)
