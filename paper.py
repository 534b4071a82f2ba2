"""
The paper's evidence beyond its retention figure, at toy size on the demo's models (docs/method.md says where
the toy differs from the release):

    main          each domain pruned to 25% and 12.5% (greedy), as is ("inf") and fine-tuned ("ft", finetune.py)
    methods       the selection methods compared at 25% and 12.5% (the paper's Fig. 4)
    calibration   1, 4, 16 and all calibration examples, 3 calibration seeds, at 12.5%, with the overlap of the
                  kept sets (the paper's Appendix B.2)
    composition   the union of two domains' subsets at the budget of one and at the sum of both, evaluated on
                  both domains and a third; and every domain's 12.5% subset evaluated on every domain
Calibration examples are the release's kind (tasks.few_shot_examples): a few-shot prompt of 2 demonstrations
then a passage and its gold continuation, every token scored. The memory-matched baselines trained from
scratch (config/std_tiny_e8.py, std_tiny_e16.py, dense_tiny.py) are evaluated on every domain in full.

    python paper.py run --ckpt out/emo_tiny --out out/paper/emo_tiny          # one model's rows (one per core)
    python paper.py baselines --ckpt out/std_tiny_e8,out/std_tiny_e16,out/dense_tiny --out out/paper/baselines
    python paper.py report --rows out/paper/emo_tiny,out/paper/std_tiny,out/paper/baselines --out results/tiny_cpu/paper
"""

import argparse
import copy
import json
import os

import torch
from tqdm import tqdm

from checkpoint import checkpoint_paths, load_model, model_name
from data.corpus import Corpus
from errors import UserError, run_command
from eval import evaluate_text
from finetune import domain_pool, finetune
from prune import keep_count, prune_composed
from sweep import corpus_domains, evaluate_domain
from tasks import few_shot_examples

FRACTIONS = (0.25, 0.125)
METHODS = ("greedy", "global", "frequency", "easy_ep", "random")
CALIBRATION_SIZES = (1, 4, 16, 48)  # 48: every example the calibration documents give here ("all")
CALIBRATION_SEEDS = (1, 2, 3)
PAIRS = "python+c:math,math+legal:python"  # two composed domains, and a third to evaluate on
SHOTS = 2


def calibration(corpus, domain, n, seed=1):
    """n calibration examples of the release's kind for a built-in domain, in one batch."""
    return [few_shot_examples(corpus.documents("calib", domain), n, SHOTS, seed)]


def pruned(model, calibrations, fraction, method="greedy", compose="union"):
    """A pruned copy of model (for one or several domains) and its per-layer records."""
    copied = copy.deepcopy(model)
    keep = keep_count(fraction, model.cfg.n_experts, model.cfg.n_shared)
    return copied, prune_composed(copied, calibrations, keep, method, compose=compose)


def row(experiment, name, domain, fraction, result, **extra):
    return {"experiment": experiment, "model": name, "domain": domain, "fraction": fraction, **extra, **result}


def main_rows(name, model, corpus, domains, args):
    """Each domain pruned to each fraction, as is and fine-tuned; the full model as the reference."""
    rows = []
    for d in tqdm(domains, desc=f"{name}: pruned, as is and fine-tuned"):
        rows.append(row("main", name, d.name, 1.0, evaluate_domain(model, d, args.batch_size, args.device),
                        variant="full"))
        for fraction in args.fractions:
            small, _ = pruned(model, [calibration(corpus, d.name, 16)], fraction)
            rows.append(row("main", name, d.name, fraction, evaluate_domain(small, d, args.batch_size, args.device),
                            variant="inf"))
            small, _ = finetune(small, domain_pool(corpus, d.name, 64))
            rows.append(row("main", name, d.name, fraction, evaluate_domain(small, d, args.batch_size, args.device),
                            variant="ft"))
    return rows


def method_rows(name, model, corpus, domains, args):
    rows = []
    for d in tqdm(domains, desc=f"{name}: selection methods"):
        for fraction in args.fractions:
            for method in METHODS:
                small, _ = pruned(model, [calibration(corpus, d.name, 16)], fraction, method)
                rows.append(row("methods", name, d.name, fraction,
                                evaluate_domain(small, d, args.batch_size, args.device), method=method))
    return rows


def jaccard(a, b):
    """Mean over layers of |a & b| / |a | b| of two pruning records' kept sets."""
    return sum(len(set(x["kept"]) & set(y["kept"])) / len(set(x["kept"]) | set(y["kept"]))
               for x, y in zip(a, b)) / len(a)


def calibration_rows(name, model, corpus, domains, args):
    """Pruned to the smallest fraction with 1, 4, 16 and all calibration examples (3 seeds but for 'all'), with
    each kept set's overlap with the one 'all' gives."""
    fraction, rows = args.fractions[-1], []
    for d in tqdm(domains, desc=f"{name}: calibration sizes"):
        reference, reference_layers = pruned(model, [calibration(corpus, d.name, CALIBRATION_SIZES[-1])], fraction)
        for size in CALIBRATION_SIZES:
            for seed in CALIBRATION_SEEDS if size < CALIBRATION_SIZES[-1] else CALIBRATION_SEEDS[:1]:
                small, layers = pruned(model, [calibration(corpus, d.name, size, seed)], fraction)
                result = evaluate_domain(small, d, args.batch_size, args.device)
                rows.append(row("calibration", name, d.name, fraction, result, examples=size, seed=seed,
                                overlap_with_all=jaccard(layers, reference_layers)))
    return rows


def parse_pairs(spec):
    """'python+c:math,...' -> [(first, second, third)]: two domains to compose and a third."""
    pairs = []
    for part in spec.split(","):
        composed, _, third = part.partition(":")
        first, _, second = composed.partition("+")
        if not (first and second and third):
            raise UserError(f"--pairs {spec!r}: give FIRST+SECOND:THIRD,...")
        pairs.append((first, second, third))
    return pairs


def composition_rows(name, model, corpus, domains, args):
    """Two domains composed at the smallest fraction (union at the sum of budgets, mean score at one budget),
    evaluated on both and a third; then every domain's subset on every domain (loss)."""
    by_name = {d.name: d for d in domains}
    fraction, rows = args.fractions[-1], []
    for first, second, third in args.pairs:
        for compose in ("union", "mean"):
            small, _ = pruned(model, [calibration(corpus, first, 16), calibration(corpus, second, 16)], fraction,
                              compose=compose)
            for target in (first, second, third):
                rows.append(row("composition", name, target, fraction,
                                evaluate_domain(small, by_name[target], args.batch_size, args.device),
                                subset=f"{first}+{second}", compose=compose,
                                experts=sum(small.cfg.layer_experts()) / small.cfg.n_layer))
    for d in tqdm(domains, desc=f"{name}: each subset on every domain"):
        small, _ = pruned(model, [calibration(corpus, d.name, 16)], fraction)
        for target in domains:
            rows.append(row("cross", name, target.name, fraction,
                            evaluate_text(small, target.tokens, args.batch_size, args.device), subset=d.name))
    return rows


def baseline_rows(name, model, domains, args):
    return [row("baseline", name, d.name, 1.0, evaluate_domain(model, d, args.batch_size, args.device),
                experts=model.cfg.n_experts) for d in domains]


# ---------------------------------------------------------------------------------------------------------
# Tables: domain averages of the rows above.

def mean(values):
    values = [v for v in values if v == v]  # NaN (no task items) left out
    return sum(values) / len(values) if values else float("nan")


def average(rows, metric, **where):
    return mean([r[metric] for r in rows if all(r.get(k) == v for k, v in where.items())])


def fractions_of(rows, experiment):
    """The fractions kept below 100% in an experiment's rows, largest first."""
    return sorted({r["fraction"] for r in rows if r["experiment"] == experiment and r["fraction"] < 1}, reverse=True)


def cell(rows, **where):
    """'loss (task accuracy)' averaged over domains."""
    return f"{average(rows, 'loss', **where):.3f} ({average(rows, 'task_accuracy', **where):.1%})"


def main_table(rows, models, baselines):
    n_experts = next(r for r in rows if r["experiment"] == "main")["keep_of"]
    head = ["experts kept"] + [f"{m} pruned, {v}" for m in models for v in ("inf", "ft")] + ["standard MoE trained "
                                                                                            "with that many", "dense"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    full = [cell(rows, experiment="main", model=m, variant="full") for m in models for _ in range(2)]
    lines.append(f"| {n_experts} (100%) | " + " | ".join(full) + " | | |")
    dense = next((b for b in baselines if b.startswith("dense")), None)
    for fraction in fractions_of(rows, "main"):
        keep = round(fraction * n_experts)
        trained = next((b for b in baselines if f"_e{keep}" in b), None)
        cells = [cell(rows, experiment="main", model=m, fraction=fraction, variant=v) for m in models
                 for v in ("inf", "ft")]
        cells += [cell(rows, experiment="baseline", model=b) if b else "-" for b in (trained, dense)]
        lines.append(f"| {keep} ({fraction:.1%}) | " + " | ".join(cells) + " |")
    return lines


def method_table(rows, models):
    lines = ["| method | experts kept | " + " | ".join(models) + " |", "|---|---" + "|---" * len(models) + "|"]
    for method in METHODS:
        for fraction in fractions_of(rows, "methods"):
            lines.append(f"| {method} | {fraction:.1%} | " + " | ".join(
                cell(rows, experiment="methods", model=m, method=method, fraction=fraction) for m in models) + " |")
    return lines


def calibration_table(rows, models):
    lines = ["| calibration examples | " + " | ".join(f"{m} loss (task acc.) | {m} overlap with all" for m in models)
             + " |", "|---" * (1 + 2 * len(models)) + "|"]
    for size in CALIBRATION_SIZES:
        cells = []
        for m in models:
            per_seed = [average(rows, "loss", experiment="calibration", model=m, examples=size, seed=s)
                        for s in CALIBRATION_SEEDS]
            per_seed = [v for v in per_seed if v == v]
            spread = (max(per_seed) - min(per_seed)) / 2
            task = average(rows, "task_accuracy", experiment="calibration", model=m, examples=size)
            overlap = average(rows, "overlap_with_all", experiment="calibration", model=m, examples=size)
            cells += [f"{mean(per_seed):.3f} ± {spread:.3f} ({task:.1%})", f"{overlap:.2f}"]
        lines.append(f"| {size if size < CALIBRATION_SIZES[-1] else f'all ({size})'} | " + " | ".join(cells) + " |")
    return lines


def composition_table(rows, models):
    lines = ["| subset | composed | experts per layer | evaluated on | " + " | ".join(
        f"{m} loss change" for m in models) + " |", "|---" * (4 + len(models)) + "|"]
    subsets = dict.fromkeys((r["subset"], r["domain"]) for r in rows if r["experiment"] == "composition")
    for subset in dict.fromkeys(s for s, _ in subsets):
        first, second = subset.split("+")
        third = next(d for s, d in subsets if s == subset and d not in (first, second))
        for compose in ("union", "mean"):
            for target in (first, second, third):
                where = dict(experiment="composition", subset=f"{first}+{second}", compose=compose, domain=target)
                experts = average(rows, "experts", model=models[0], **where)
                changes = [average(rows, "loss", model=m, **where)
                           - average(rows, "loss", experiment="main", model=m, domain=target, variant="full")
                           for m in models]
                lines.append(f"| {first}+{second} | {compose} | {experts:.1f} | {target} | "
                             + " | ".join(f"{c:+.3f}" for c in changes) + " |")
    return lines


def cross_table(rows, model, domains):
    """Loss change from the full model, subset (row) evaluated on domain (column); and the two means."""
    change = {(r["subset"], r["domain"]): r["loss"] - average(rows, "loss", experiment="main", model=model,
                                                               domain=r["domain"], variant="full")
              for r in rows if r["experiment"] == "cross" and r["model"] == model}
    lines = [f"{model}:", "", "| subset \\ evaluated on | " + " | ".join(domains) + " |",
             "|---" * (1 + len(domains)) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{change[(s, d)]:+.3f}" for d in domains) + " |" for s in domains]
    diagonal = mean([change[(d, d)] for d in domains])
    off = mean([change[(s, d)] for s in domains for d in domains if s != d])
    return lines + ["", f"{model}: mean loss change on its own domain {diagonal:+.3f}, on the others {off:+.3f}."]


def write_report(rows, out):
    models = list(dict.fromkeys(r["model"] for r in rows if r["experiment"] == "main"))
    baselines = list(dict.fromkeys(r["model"] for r in rows if r["experiment"] == "baseline"))
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["experiment"] == "main"))
    smallest = fractions_of(rows, "main")[-1]
    sections = [
        ("Pruned as is (inf) and fine-tuned (ft), against models trained with that many experts (average over "
         "domains: loss (task accuracy))", main_table(rows, models, baselines)),
        ("Selection methods (average over domains: loss (task accuracy))", method_table(rows, models)),
        (f"Calibration size ({smallest:.1%}; mean ± half the range over 3 calibration seeds)",
         calibration_table(rows, models)),
        (f"Composition ({smallest:.1%} per domain; loss change from the full model)", composition_table(rows, models)),
        (f"Each domain's {smallest:.1%} subset on every domain (loss change from the full model)",
         [line for m in models for line in cross_table(rows, m, domains) + [""]]),
    ]
    text = "".join(f"## {title}\n\n" + "\n".join(lines) + "\n\n" for title, lines in sections)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("run", "baselines", "report"))
    parser.add_argument("--ckpt", dest="paths", type=checkpoint_paths, default=[], help="checkpoints, comma-separated")
    parser.add_argument("--rows", default="", help="report: the folders of run and baselines, comma-separated")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--keep", dest="fractions", type=lambda t: [float(f) for f in t.split(",")],
                        default=list(FRACTIONS), help="fractions of the experts kept, largest first")
    parser.add_argument("--pairs", type=parse_pairs, default=parse_pairs(PAIRS), help="composition: A+B:C,...")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.step == "report":
        rows = []
        for folder in args.rows.split(","):
            if not os.path.exists(os.path.join(folder, "rows.json")):
                raise UserError(f"no rows at {os.path.join(folder, 'rows.json')}: run `paper.py run` first")
            rows += json.load(open(os.path.join(folder, "rows.json")))
        print(write_report(rows, args.out))
        return
    if not args.paths:
        raise UserError(f"paper.py {args.step} needs --ckpt")
    corpus = Corpus(args.data_dir)
    domains = corpus_domains(corpus, 16, 16384)
    rows = []
    for path in args.paths:
        model, _ = load_model(path, args.device)
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        name = model_name(path)
        if args.step == "baselines":
            rows += baseline_rows(name, model, domains, args)
            continue
        for experiment in (main_rows, method_rows, calibration_rows, composition_rows):
            rows += [{**r, "keep_of": model.cfg.n_experts} for r in experiment(name, model, corpus, domains, args)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}/rows.json")


if __name__ == "__main__":
    run_command(main)
