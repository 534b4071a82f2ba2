"""
The regime where sparsity pays (make regime, config/*_micro.py): first the paper's premise, then its comparison.

    premise      does the standard MoE beat the dense model with the same active FFN, and the standard MoE with
                 1/8 of its experts, by more than the two seeds' spread? (final validation loss)
    trend        the three gaps (standard MoE - dense, 1/8 experts - standard MoE, EMO - standard MoE) at three
                 token budgets 4x apart: a token-budget effect shrinks or grows with tokens, a contradiction not
    retention    EMO and the standard MoE pruned to 50/25/12.5/6.25% (the sweep), against the 1/8-experts model
                 and the dense model trained from scratch, loss and task accuracy, mean ± half the range of seeds

    python -m experiments.regime --runs out/regime --out results/micro_cpu
    python -m experiments.regime --diagnose out/diagnose_micro --regime micro --out results/micro_cpu  # the gap

--runs holds one folder per training, named MODEL_seedSEED_stepsSTEPS (scripts/regime.sh makes them), the
sweeps in sweeps/MODEL_seedSEED and the baselines' rows in baselines_seedSEED (experiments/paper.py
baselines). Writes regime.md, gaps.png and learning_curves.png.
"""

import argparse
import json
import os
import re

import torch

from checkpoint import load_checkpoint, model_config
from errors import UserError, run_command
from experiments.report import mean, pyplot
from model import EMO

MODELS = ("emo_micro", "std_micro", "std_micro_e8", "dense_micro")
GAPS = (("std_micro", "dense_micro"), ("std_micro_e8", "std_micro"), ("emo_micro", "std_micro"))
RUN_NAME = re.compile(r"(?P<model>\w+?)_seed(?P<seed>\d+)_steps(?P<steps>\d+)$")


def run_summary(folder):
    """A finished run: parameters (all, embeddings included), tokens trained on, and its validation curve
    [(tokens, mean validation loss over domains)]."""
    ckpt = load_checkpoint(folder)
    with torch.device("meta"):
        total, _ = EMO(model_config(ckpt, folder)).num_params()
    train = ckpt["train_config"]
    tokens_per_step = train["batch_size"] * train["grad_accum"] * ckpt["model_config"]["seq_len"] * ckpt["world"]
    if ckpt["step"] != train["max_steps"]:
        raise UserError(f"{folder} stopped at step {ckpt['step']} of {train['max_steps']}: finish it first")
    curve = [(r["step"] * tokens_per_step, mean(list(r["val"].values()))) for r in ckpt["history"] if "val" in r]
    return {"params": total, "tokens": ckpt["step"] * tokens_per_step, "loss": curve[-1][1], "curve": curve}


def read_runs(root):
    """{(model, seed, steps): run_summary} of every finished run in root."""
    runs = {}
    for name in sorted(os.listdir(root)):
        match = RUN_NAME.match(name)
        if match and os.path.exists(os.path.join(root, name, "ckpt.pt")):
            key = (match["model"], int(match["seed"]), int(match["steps"]))
            runs[key] = run_summary(os.path.join(root, name))
    if not runs:
        raise UserError(f"no finished runs in {root}: run scripts/regime.sh first")
    return runs


def spread(values):
    """(mean, half the range)."""
    return mean(values), (max(values) - min(values)) / 2


def premise(runs, steps, seeds):
    """Per comparison (the standard MoE against the dense model and against 1/8 of its experts): the margin per
    seed (other - standard MoE, paired by seed), its mean, each model's half-range over seeds, and the verdict:
    holds when the standard MoE wins with every seed and the mean margin exceeds both half-ranges."""
    rows = []
    for other in ("dense_micro", "std_micro_e8"):
        margins = [runs[(other, s, steps)]["loss"] - runs[("std_micro", s, steps)]["loss"] for s in seeds]
        halves = [spread([runs[(m, s, steps)]["loss"] for s in seeds])[1] for m in ("std_micro", other)]
        holds = min(margins) > 0 and mean(margins) > max(halves)
        rows.append({"other": other, "margins": margins, "margin": mean(margins), "spreads": halves, "holds": holds})
    return rows


def budget_gaps(runs, seed):
    """{budget steps: {gap name: value}} at every budget where the four models of seed have finished."""
    budgets = sorted({steps for (_, s, steps) in runs if s == seed})
    return {steps: {f"{a} - {b}": runs[(a, seed, steps)]["loss"] - runs[(b, seed, steps)]["loss"] for a, b in GAPS}
            for steps in budgets if all((m, seed, steps) in runs for m in MODELS)}


def retention_rows(root, seeds):
    """(fraction -> {model: (loss mean, half-range, task mean, half-range)}) of the sweeps, and {baseline: same}."""
    per_seed = {}
    for model in ("emo_micro", "std_micro"):
        for seed in seeds:
            path = os.path.join(root, "sweeps", f"{model}_seed{seed}", "results.json")
            if not os.path.exists(path):
                raise UserError(f"no sweep at {path}: run scripts/regime.sh")
            with open(path) as f:
                for r in json.load(f):
                    per_seed.setdefault((r["fraction"], model), {}).setdefault(seed, []).append(r)
    for seed in seeds:
        path = os.path.join(root, f"baselines_seed{seed}", "rows.json")
        if not os.path.exists(path):
            raise UserError(f"no baseline rows at {path}: run scripts/regime.sh")
        with open(path) as f:
            for r in json.load(f):  # as trained (paper.py also fine-tunes them: variant 'ft')
                if r.get("variant", "inf") == "inf":
                    per_seed.setdefault((None, r["model"].split("_seed")[0]), {}).setdefault(seed, []).append(r)
    table = {}
    for key, seeds_rows in per_seed.items():
        losses = [mean([r["loss"] for r in rows]) for rows in seeds_rows.values()]
        tasks = [mean([r["task_accuracy"] for r in rows]) for rows in seeds_rows.values()]
        table[key] = (*spread(losses), *spread(tasks))
    return table


def cell(values):
    loss, loss_half, task, task_half = values
    return f"{loss:.3f} ± {loss_half:.3f} ({100 * task:.1f} ± {100 * task_half:.1f}%)"


def write_report(runs, root, out):
    seeds = sorted({s for (_, s, _) in runs})
    main = max(steps for (_, _, steps) in runs)
    trend_seed = max(seeds, key=lambda seed: len({steps for (_, s, steps) in runs if s == seed}))  # the budgets
    lines = ["## The runs", "", "| model | seed | steps | parameters | tokens | tokens per parameter | final "
             "validation loss |", "|---|---|---|---|---|---|---|"]
    for (model, seed, steps), r in sorted(runs.items(), key=lambda item: (MODELS.index(item[0][0]), *item[0][1:])):
        lines.append(f"| {model} | {seed} | {steps} | {r['params'] / 1e6:.3f}M | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['tokens'] / r['params']:.1f} | {r['loss']:.4f} |")
    lines += ["", f"## The premise ({main} steps, seeds {', '.join(map(str, seeds))})", "",
              "| standard MoE against | margin per seed (its loss - the standard MoE's) | mean margin | half-range "
              "of the two models' losses | holds |", "|---|---|---|---|---|"]
    for p in premise(runs, main, seeds):
        lines.append(f"| {p['other']} | {', '.join(f'{m:+.4f}' for m in p['margins'])} | {p['margin']:+.4f} | "
                     f"{p['spreads'][0]:.4f}, {p['spreads'][1]:.4f} | {'holds' if p['holds'] else 'does not hold'} |")
    lines += ["", "Holds: the standard MoE is better with every seed and the mean margin exceeds both models' "
              "half-ranges over the seeds.", "", f"## The gaps against tokens (seed {trend_seed})", "",
              "| steps | tokens | " + " | ".join(f"{a} - {b}" for a, b in GAPS) + " |", "|---" * (2 + len(GAPS)) + "|"]
    gaps = budget_gaps(runs, trend_seed)
    for steps, values in gaps.items():
        tokens = runs[("std_micro", trend_seed, steps)]["tokens"]
        lines.append(f"| {steps} | {tokens / 1e6:.2f}M | " + " | ".join(f"{v:+.4f}" for v in values.values()) + " |")
    table = retention_rows(root, seeds)
    fractions = sorted({f for f, _ in table if f is not None}, reverse=True)
    lines += ["", f"## Retention against models trained from scratch (loss (task accuracy), mean ± half-range of "
              f"{len(seeds)} seeds, average over domains)", "",
              "| experts kept | EMO pruned | standard MoE pruned |", "|---|---|---|"]
    for f in fractions:
        lines.append(f"| {f:.2%} | {cell(table[(f, 'emo_micro')])} | {cell(table[(f, 'std_micro')])} |")
    for baseline in ("std_micro_e8", "dense_micro"):
        lines.append(f"| {baseline} trained from scratch | {cell(table[(None, baseline)])} | |")
    os.makedirs(out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "regime.md"), "w") as f:
        f.write(text)
    plot_gaps(gaps, runs, trend_seed, os.path.join(out, "gaps.png"))
    plot_curves(runs, os.path.join(out, "learning_curves.png"))
    return text


def plot_gaps(gaps, runs, seed, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    tokens = [runs[("std_micro", seed, steps)]["tokens"] for steps in gaps]
    for a, b in GAPS:
        ax.plot(tokens, [values[f"{a} - {b}"] for values in gaps.values()], marker="o", label=f"{a} - {b}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss gap")
    ax.set_title(f"gaps against the token budget (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs, path):
    """Validation loss against tokens of every run, a panel per budget."""
    plt = pyplot()
    budgets = sorted({steps for (_, _, steps) in runs})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.6), squeeze=False)
    for ax, steps in zip(axes[0], budgets):
        for (model, seed, s), r in sorted(runs.items()):
            if s == steps:
                ax.plot(*zip(*r["curve"]), label=f"{model} {seed}", alpha=0.8)
        ax.set_title(f"{steps} steps")
        ax.set_xlabel("tokens")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# EMO's full-model gap, diagnosed (scripts/diagnose.sh).

CHANGES = (("base", "the release's settings (this regime's configs)"),
           ("batch64", "batches of 4 x 16 sequences, a quarter of the steps (balanced per micro-batch of 16)"),
           ("batch64_step", "the same, balanced over the step's 64 sequences (lb_scope=step; EMO)"),
           ("lr_half", "learning rate halved"), ("lr_double", "learning rate doubled"),
           ("lr_quadruple", "learning rate quadrupled"),
           ("z0", "no router z-loss (EMO)"),
           ("anneal", "cosine to 0.1x over the first 90% of the steps, the last tenth linear to 0"))


def diagnosis_runs(folder, regime, seeds):
    """{(family, change, seed): final validation loss} of scripts/diagnose.sh's runs and their base runs."""
    losses = {}
    for family in ("emo", "std"):
        for seed in seeds:
            if regime == "micro":
                base = os.path.join("out/regime", f"{family}_micro_seed{seed}_steps2400")
            else:
                base = f"out/{family}_tiny" if seed == 1337 else os.path.join(folder, f"{family}_base_seed{seed}")
            losses[(family, "base", seed)] = run_summary(base)["loss"]
            for change, _ in CHANGES[1:]:
                run = os.path.join(folder, f"{family}_{change}_seed{seed}")
                if os.path.exists(os.path.join(run, "done")):
                    losses[(family, change, seed)] = run_summary(run)["loss"]
    return losses


LEARNING_RATES = (("lr_half", "halved"), ("base", "as configured"), ("lr_double", "doubled"),
                  ("lr_quadruple", "quadrupled"))


def tuned_learning_rates(losses, seeds):
    """Each family at its own best learning rate, as the paper tuned each: {family: (change, [loss per seed])}
    for the one of LEARNING_RATES with the lowest mean loss over seeds (only those run for every seed). Chosen on
    the validation loss that is reported, so the tuned gap is a best case for each family."""
    tuned = {}
    for family in ("emo", "std"):
        runs = {change: [losses[(family, change, s)] for s in seeds] for change, _ in LEARNING_RATES
                if all((family, change, s) in losses for s in seeds)}
        best = min(runs, key=lambda change: mean(runs[change]))
        tuned[family] = (best, runs[best])
    return tuned


def gaps(emo, std):
    """EMO's gap to the standard MoE, seed by seed: (differences, mean relative gap)."""
    return [e - t for e, t in zip(emo, std)], mean([e / t - 1 for e, t in zip(emo, std)])


def pm(values):
    middle, half = spread(values)
    return f"{middle:.4f} ± {half:.4f}"


def write_diagnosis(folder, regime, out, seeds=(1337, 7)):
    """diagnosis.md: per change, EMO's and the standard MoE's final validation loss and the gap, mean ± half the
    range of the seeds (EMO-only changes against the standard MoE of the base, or of batch64); and the base EMO
    evaluated with document pools against token routing on the same tokens."""
    losses = diagnosis_runs(folder, regime, seeds)
    lines = [f"EMO's full-model gap, diagnosed ({regime}; final validation loss, mean ± half the range of seeds "
             f"{', '.join(map(str, seeds))}):", "", "| change | EMO | standard MoE | gap EMO - std | gap (relative) |",
             "|---|---|---|---|---|"]
    for change, description in CHANGES:
        std_change = {"batch64_step": "batch64", "z0": "base"}.get(change, change)
        if not all((f, c, s) in losses for f, c in (("emo", change), ("std", std_change)) for s in seeds):
            continue
        emo = [losses[("emo", change, s)] for s in seeds]
        std = [losses[("std", std_change, s)] for s in seeds]
        differences, relative = gaps(emo, std)
        which = "" if std_change == change else f" ({std_change})"
        lines.append(f"| {description} | {pm(emo)} | {pm(std)}{which} | {pm(differences)} | {100 * relative:+.2f}% |")
    # once any rate besides the configured one has every seed
    if any(change != "base" and all((f, change, s) in losses for f in ("emo", "std") for s in seeds)
           for change, _ in LEARNING_RATES):
        tuned = tuned_learning_rates(losses, seeds)
        names = dict(LEARNING_RATES)
        (emo_lr, emo), (std_lr, std) = tuned["emo"], tuned["std"]
        differences, relative = gaps(emo, std)
        lines += ["", "Each family at its best of the learning rates run with every seed (chosen on this validation "
                  f"loss): EMO with the learning rate {names[emo_lr]} {pm(emo)}, the standard MoE {names[std_lr]} "
                  f"{pm(std)}; gap {pm(differences)} ({100 * relative:+.2f}%)."]
    pools = []
    for seed in seeds:
        path = os.path.join(folder, f"pool_eval_seed{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            pools.append([mean([r["loss"] for r in next(iter(saved[k].values())).values()])
                          for k in ("tokens", "pools")])
    if len(pools) == len(seeds):
        lines += ["", "The base EMO evaluated with document pools of a quarter of its experts (as the release's "
                  f"in-loop evaluator) against token routing: {pm([p for _, p in pools])} against "
                  f"{pm([t for t, _ in pools])} (change {pm([p - t for t, p in pools])})."]
    os.makedirs(out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "diagnosis.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="out/regime")
    parser.add_argument("--diagnose", default="", help="scripts/diagnose.sh's folder: tabulate its runs instead")
    parser.add_argument("--regime", default="micro", choices=("micro", "tiny"))
    parser.add_argument("--out", default="results/micro_cpu")
    parser.add_argument("--seeds", default="1337,7", help="--diagnose: the seeds a change is shown for")
    args = parser.parse_args(argv)
    if args.diagnose:
        print(write_diagnosis(args.diagnose, args.regime, args.out, tuple(int(s) for s in args.seeds.split(","))))
        return
    print(write_report(read_runs(args.runs), args.runs, args.out))


if __name__ == "__main__":
    run_command(main)
