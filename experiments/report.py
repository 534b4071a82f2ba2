"""
Every table and plot of the experiments, from results already computed: the retention report of
experiments/sweep.py (the table as markdown, CSV and JSON, quality against the fraction of experts kept, EMO
against the standard MoE, the expert-usage heatmap), one report from sweeps run side by side, the spread of a
sweep repeated with other seeds, the training curves of runs, and the tables of experiments/paper.py.

    write_sweep(rows, usage, domains, "out/sweep_tiny")     # table.md, results.csv/json, retention_*.png, ...
    python -m experiments.report --combine out/sweeps/emo_tiny,out/sweeps/std_tiny --out out/sweep_tiny
    python -m experiments.report --seeds out/sweep_tiny,out/sweep_tiny_seed2 --out out/seeds.md   # mean, spread
    python -m experiments.report --curves out/emo_tiny,out/std_tiny --out out/sweep_tiny          # training curves
    python -m experiments.report --paper out/paper/emo_tiny,out/paper/std_tiny,out/paper/baselines \
        --out results/tiny_cpu/paper                                                              # paper.py's tables
    python -m experiments.report --table3 out/table3 --out out/table3       # scripts/table3.sh's Table 3, Figure 3

A sweep's row is one (model, domain, fraction kept): loss, next-token accuracy, task accuracy (tasks.py) and
their changes from the full model; a paper row says which experiment made it and what it varied.
"""

import argparse
import csv
import json
import math
import os

import torch

from errors import UserError, run_command

METRICS = {"loss": "loss", "accuracy": "next-token accuracy", "task_accuracy": "task accuracy"}


def mean(values):
    """The mean of values, NaN (a domain without task items) left out; NaN when nothing is left."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def averages(rows):
    """Sweep rows averaged over domains: {(model, fraction): {metric and its change: mean, "keep": experts
    kept}}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["fraction"]), []).append(r)
    keys = ("loss", "accuracy", "task_accuracy", "d_loss", "d_loss_rel", "d_accuracy", "d_task_accuracy")
    return {k: {"keep": group[0]["keep"], **{key: mean([r[key] for r in group]) for key in keys}}
            for k, group in groups.items()}


def percent(value, points=False):
    """0.123 -> '12.3%'; with points a change in percentage points: '+1.2 pt'."""
    if math.isnan(value):
        return "-"
    return f"{100 * value:+.1f} pt" if points else f"{value:.1%}"


def markdown_table(rows):
    """Average over domains per model and fraction kept (each metric with its change), then the loss and
    task-accuracy changes per domain."""
    avg = averages(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    head = "| experts kept | " + " | ".join(f"{m} loss (change) | {m} next-token acc. (change) | {m} task acc. (change)"
                                           for m in models) + " |"
    lines = ["Average over domains:", "", head, "|---" * (1 + 3 * len(models)) + "|"]
    for f in fractions:
        cells = []
        for m in models:
            a = avg[(m, f)]
            cells += [f"{a['loss']:.3f} ({a['d_loss']:+.3f}, {a['d_loss_rel']:+.1%})",
                      f"{percent(a['accuracy'])} ({percent(a['d_accuracy'], True)})",
                      f"{percent(a['task_accuracy'])} ({percent(a['d_task_accuracy'], True)})"]
        lines.append(f"| {avg[(models[0], f)]['keep']} ({f:.1%}) | " + " | ".join(cells) + " |")
    by_key = {(r["model"], r["fraction"], r["domain"]): r for r in rows}
    per_domain = (("d_loss", "Loss change", 1), ("d_task_accuracy", "Task accuracy change (points)", 100))
    for metric, title, scale in per_domain:
        lines += ["", f"{title} per domain (pruned for that domain vs the full model):", "",
                  "| model | experts kept | " + " | ".join(domains) + " |", "|---|---" + "|---" * len(domains) + "|"]
        for m in models:
            for f in fractions[1:]:
                values = [by_key[(m, f, d)][metric] for d in domains]
                cells = ["-" if math.isnan(v) else f"{scale * v:+.{3 if scale == 1 else 1}f}" for v in values]
                lines.append(f"| {m} | {f:.1%} | " + " | ".join(cells) + " |")
    items = {d: next(r["task_items"] for r in rows if r["domain"] == d) for d in domains}
    lines += ["", "Task items per domain: " + ", ".join(f"{d} {n}" for d, n in items.items()) + "."]
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_retention(rows, path, metric):
    """Quality vs fraction of experts kept: one panel per domain and one for the average, a line per model."""
    plt = pyplot()
    domains = list(dict.fromkeys(r["domain"] for r in rows)) + ["average"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    avg = averages(rows)
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(domains) / cols), cols, figsize=(12, 3.2 * math.ceil(len(domains) / cols)),
                             squeeze=False)
    for ax, domain in zip(axes.flat, domains):
        for m in models:
            if domain == "average":
                points = sorted((f, a[metric]) for (mm, f), a in avg.items() if mm == m)
            else:
                points = sorted((r["fraction"], r[metric]) for r in rows if r["model"] == m and r["domain"] == domain)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_title(domain, fontweight="bold" if domain == "average" else "normal")
        ax.set_xlabel("fraction of experts kept")
        ax.set_ylabel(METRICS[metric])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(usage, domains, path):
    """Heatmaps of expert usage: a row of layers per model, each a (domain x expert) map of mean router
    probability. Domain-specific experts show as bright cells alone in their column."""
    plt = pyplot()
    models = list(usage)
    n_layer = usage[models[0]].shape[1]
    fig, axes = plt.subplots(len(models), n_layer, figsize=(3.2 * n_layer, 2.6 * len(models)), squeeze=False)
    for row, m in enumerate(models):
        for layer in range(n_layer):
            ax = axes[row, layer]
            n_routed = usage[m].shape[2]
            ax.imshow(usage[m][:, layer].numpy(), aspect="auto", cmap="viridis")
            ax.set_title(f"{m}, layer {layer}", fontsize=9)
            ax.set_yticks(range(len(domains)))
            ax.set_yticklabels(domains if layer == 0 else [], fontsize=8)
            ax.set_xticks(range(0, n_routed, max(1, n_routed // 8)))
            ax.set_xlabel("routed expert", fontsize=8)
    fig.suptitle("mean router probability per domain (brighter = more used; each panel its own scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(runs, path):
    """Training curves of runs from their history.json: LM loss per step and mean validation loss."""
    plt = pyplot()
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, run in runs.items():
        with open(os.path.join(run, "history.json")) as f:
            history = json.load(f)
        steps = [r["step"] for r in history]
        train_ax.plot(steps, [r["lm_loss"] for r in history], label=label, alpha=0.8)
        val = [(r["step"], sum(r["val"].values()) / len(r["val"])) for r in history if "val" in r]
        val_ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label=label)
    for ax, title in ((train_ax, "training LM loss"), (val_ax, "validation loss (mean over domains)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(rows, usage, domains, out_dir):
    """Every output of a sweep into out_dir; returns the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for metric in METRICS:
        plot_retention(rows, os.path.join(out_dir, f"retention_{metric}.png"), metric)
    plot_usage(usage, domains, os.path.join(out_dir, "expert_usage.png"))
    with open(os.path.join(out_dir, "usage.json"), "w") as f:
        json.dump({"domains": domains, "usage": {m: u.tolist() for m, u in usage.items()}}, f)
    return table


def combine(sweeps, out_dir):
    """One report from sweeps of different models over the same domains (run side by side, one per core)."""
    rows, usage, domains = [], {}, None
    for folder in sweeps:
        for name in ("results.json", "usage.json"):
            if not os.path.exists(os.path.join(folder, name)):
                raise UserError(f"no sweep results at {os.path.join(folder, name)}")
        with open(os.path.join(folder, "results.json")) as f:
            rows += json.load(f)
        with open(os.path.join(folder, "usage.json")) as f:
            saved = json.load(f)
        if domains is not None and saved["domains"] != domains:
            raise UserError(f"{folder} covers domains {saved['domains']}, not {domains}")
        domains = saved["domains"]
        usage.update({m: torch.tensor(u) for m, u in saved["usage"].items()})
    return write_sweep(rows, usage, domains, out_dir)


def spread_table(sweeps):
    """Mean and spread (half the range) over sweeps repeated with other seeds, of each model's changes at each
    fraction kept below 100%: {(model, fraction): {metric: (mean, half range)}} and its markdown. Models are
    matched by their order in each sweep (their names may carry the seed) and named as in the first."""
    runs, names = [], None
    for folder in sweeps:
        path = os.path.join(folder, "results.json")
        if not os.path.exists(path):
            raise UserError(f"no sweep results at {path}")
        with open(path) as f:
            rows = json.load(f)
        models = list(dict.fromkeys(r["model"] for r in rows))
        runs.append({(models.index(m), f): a for (m, f), a in averages(rows).items()})
        names = names or models
    if any(run.keys() != runs[0].keys() for run in runs):
        raise UserError(f"the sweeps {sweeps} do not cover the same models and fractions")
    stats = {}
    for key in runs[0]:
        if key[1] < 1.0:
            values = {m: [run[key][m] for run in runs] for m in ("d_loss", "d_accuracy", "d_task_accuracy")}
            stats[(names[key[0]], key[1])] = {m: (sum(v) / len(v), (max(v) - min(v)) / 2) for m, v in values.items()}
    lines = [f"Changes from the full model, mean ± half the range over {len(runs)} seeds:", "",
             "| model | experts kept | loss change | next-token acc. change | task acc. change |",
             "|---|---|---|---|---|"]
    for (model, fraction), s in sorted(stats.items(), key=lambda item: (item[0][0], -item[0][1])):
        lines.append(f"| {model} | {fraction:.1%} | {s['d_loss'][0]:+.3f} ± {s['d_loss'][1]:.3f} | "
                     f"{100 * s['d_accuracy'][0]:+.1f} ± {100 * s['d_accuracy'][1]:.1f} pt | "
                     f"{100 * s['d_task_accuracy'][0]:+.1f} ± {100 * s['d_task_accuracy'][1]:.1f} pt |")
    return stats, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# experiments/paper.py's tables: domain averages of its rows; where a model was run with several seeds (its
# twins named MODEL_seedN), the mean and half the range over the seeds.

def with_seeds(rows):
    """Rows with the seed out of the model's name: emo_tiny_seed7 -> model emo_tiny, seed '7' (else '-')."""
    out = []
    for r in rows:
        model, _, seed = r["model"].partition("_seed")
        out.append({**r, "model": model, "seed": seed or "-"})
    return out


def average(rows, metric, **where):
    """The mean of metric over the rows that match every key = value of where."""
    return mean([r[metric] for r in rows if all(r.get(k) == v for k, v in where.items())])


def over_seeds(rows, metric, over="seed", **where):
    """(mean over the seeds of the domain average, half the range, how many seeds); over names the seed's key
    (the model's seed, or another such as the calibration seed)."""
    seeds = sorted({r[over] for r in rows if all(r.get(k) == v for k, v in where.items())})
    values = [average(rows, metric, **{**where, over: s}) for s in seeds]
    values = [v for v in values if not math.isnan(v)] or [float("nan")]
    return mean(values), (max(values) - min(values)) / 2, len(values)


def number(rows, metric, digits=3, scale=1, over="seed", **where):
    """'4.576' for one seed, '4.576 ± 0.004' for several."""
    middle, half, n = over_seeds(rows, metric, over, **where)
    text = f"{scale * middle:.{digits}f}"
    return text + (f" ± {scale * half:.{digits}f}" if n > 1 else "")


def cell(rows, **where):
    """'loss (task accuracy)' averaged over domains (and seeds)."""
    return f"{number(rows, 'loss', **where)} ({number(rows, 'task_accuracy', 1, 100, **where)}%)"


def fractions_of(rows, experiment):
    """The fractions kept below 100% in an experiment's rows, largest first."""
    return sorted({r["fraction"] for r in rows if r["experiment"] == experiment and r["fraction"] < 1}, reverse=True)


def values_of(rows, experiment, key):
    """The values key takes in an experiment's rows, in the order they first appear."""
    return list(dict.fromkeys(r[key] for r in rows if r["experiment"] == experiment))


def paired_baseline(baselines, keep, top_k):
    """The model trained from scratch a subset of keep experts is paired with: the standard MoE trained with
    keep experts (name ending _eKEEP), or the dense model where keep is top_k (the paper's Dense @ 8 with 8)."""
    trained = next((b for b in baselines if b.endswith(f"_e{keep}")), None)
    return trained or (next((b for b in baselines if b.startswith("dense")), None) if keep == top_k else None)


def pruned_table(rows, models, baselines):
    """Pruned as is and fine-tuned against the model trained from scratch of its size (as is and fine-tuned),
    and the decomposition of the difference."""
    first = next(r for r in rows if r["experiment"] == "pruned")
    n_experts, top_k = first["model_experts"], first["model_top_k"]
    head = ["experts kept"] + [f"{m} pruned, {v}" for m in models for v in ("inf", "ft")] + [
        "trained from scratch", "it, inf", "it, ft"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    full = [cell(rows, experiment="pruned", model=m, variant="full") for m in models for _ in range(2)]
    lines.append(f"| {n_experts} (100%) | " + " | ".join(full) + " | | | |")
    decomposition = []
    for fraction in fractions_of(rows, "pruned"):
        keep = round(fraction * n_experts)
        baseline = paired_baseline(baselines, keep, top_k)
        cells = [cell(rows, experiment="pruned", model=m, fraction=fraction, variant=v) for m in models
                 for v in ("inf", "ft")]
        cells += [baseline or "-"] + [cell(rows, experiment="baseline", model=baseline, variant=v) if baseline
                                      else "-" for v in ("inf", "ft")]
        lines.append(f"| {keep} ({fraction:.2%}) | " + " | ".join(cells) + " |")
        if baseline and len(models) == 2:
            emo, std = models

            def loss(**where):
                return over_seeds(rows, "loss", **where)[0]
            emo_full, std_full = (loss(experiment="pruned", model=m, variant="full") for m in (emo, std))
            subset = loss(experiment="pruned", model=emo, fraction=fraction, variant="inf")
            trained = loss(experiment="baseline", model=baseline, variant="inf")
            decomposition.append(
                f"- {fraction:.2%}: {emo} pruned - {baseline} = {subset - trained:+.3f} = {emo}'s full-model gap "
                f"{emo_full - std_full:+.3f} + its pruning cost {subset - emo_full:+.3f} - the standard MoE's gain "
                f"from its extra experts {trained - std_full:+.3f}")
    return lines + ([""] + decomposition if decomposition else [])


def merge_table(rows, models):
    """At the smallest fraction: the full model, the subset, the subset fine-tuned, and the fine-tuned subset
    merged back, on the subset's domain; the merged model on the other domains against the full model."""
    fraction = values_of(rows, "merge", "fraction")[0]
    lines = ["| model | full | subset | subset, fine-tuned | merged back | merged back, other domains (full) |",
             "|---|---|---|---|---|---|"]
    for m in models:
        merged = [r for r in rows if r["experiment"] == "merge" and r["model"] == m]
        merged_own = [r for r in merged if r["domain"] == r["subset"]]
        merged_other = [r for r in merged if r["domain"] != r["subset"]]
        full_other = [{**r, "loss": average(rows, "loss", experiment="pruned", model=m, variant="full",
                                            domain=r["domain"], seed=r["seed"])} for r in merged_other]
        lines.append(f"| {m} | {cell(rows, experiment='pruned', model=m, variant='full')} | "
                     f"{cell(rows, experiment='pruned', model=m, fraction=fraction, variant='inf')} | "
                     f"{cell(rows, experiment='pruned', model=m, fraction=fraction, variant='ft')} | "
                     f"{cell(merged_own)} | {number(merged_other, 'loss')} ({number(full_other, 'loss')}) |")
    return lines


def method_table(rows, models):
    lines = ["| method | experts kept | " + " | ".join(models) + " |", "|---|---" + "|---" * len(models) + "|"]
    for method in values_of(rows, "methods", "method"):
        for fraction in fractions_of(rows, "methods"):
            lines.append(f"| {method} | {fraction:.1%} | " + " | ".join(
                cell(rows, experiment="methods", model=m, method=method, fraction=fraction) for m in models) + " |")
    return lines


def calibration_table(rows, models):
    """Per calibration size (and 16 examples without a few-shot prompt): the loss's mean ± half the range over the
    calibration seeds, the task accuracy, and the kept sets' overlap with those of every example ('all')."""
    sizes = sorted(values_of(rows, "calibration", "examples"))
    lines = ["| calibration examples | " + " | ".join(f"{m} loss (task acc.) | {m} overlap with all" for m in models)
             + " |", "|---" * (1 + 2 * len(models)) + "|"]
    arms = [(size, 2) for size in sizes] + [(s, shots) for s, shots in dict.fromkeys(
        (r["examples"], r["shots"]) for r in rows if r["experiment"] == "calibration" and r["shots"] != 2)]
    for size, shots in arms:
        cells = []
        for m in models:
            where = dict(experiment="calibration", model=m, examples=size, shots=shots)
            cells += [f"{number(rows, 'loss', over='calibration_seed', **where)} "
                      f"({average(rows, 'task_accuracy', **where):.1%})",
                      f"{average(rows, 'overlap_with_all', **where):.2f}"]
        label = f"all ({size})" if size == sizes[-1] else str(size)
        lines.append(f"| {label}{'' if shots == 2 else f', {shots}-shot'} | " + " | ".join(cells) + " |")
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
                           - average(rows, "loss", experiment="pruned", model=m, domain=target, variant="full")
                           for m in models]
                lines.append(f"| {first}+{second} | {compose} | {experts:.1f} | {target} | "
                             + " | ".join(f"{c:+.3f}" for c in changes) + " |")
    return lines


def cross_table(rows, model, domains):
    """Loss change from the full model, subset (row) evaluated on domain (column); and the two means."""
    change = {(r["subset"], r["domain"]): r["loss"] - average(rows, "loss", experiment="pruned", model=model,
                                                               domain=r["domain"], variant="full", seed=r["seed"])
              for r in rows if r["experiment"] == "cross" and r["model"] == model}
    lines = [f"{model}:", "", "| subset \\ evaluated on | " + " | ".join(domains) + " |",
             "|---" * (1 + len(domains)) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{change[(s, d)]:+.3f}" for d in domains) + " |" for s in domains]
    diagonal = mean([change[(d, d)] for d in domains])
    off = mean([change[(s, d)] for s in domains for d in domains if s != d])
    return lines + ["", f"{model}: mean loss change on its own domain {diagonal:+.3f}, on the others {off:+.3f}."]


def retention_table(rows):
    """Every model of the retention step pruned to each fraction, routing by token and with pools."""
    models = values_of(rows, "retention", "model")
    pools = sorted(values_of(rows, "retention", "pool_eval"))
    head = [f"{m}{'' if p == 0 else f', pools of {p}'}" for m in models for p in pools]
    lines = ["| experts kept | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for fraction in sorted(values_of(rows, "retention", "fraction"), reverse=True):
        cells = [cell(rows, experiment="retention", model=m, fraction=fraction, pool_eval=p) for m in models
                 for p in pools]
        lines.append(f"| {fraction:.2%} | " + " | ".join(cells) + " |")
    return lines


def write_paper(rows, out):
    """paper.py's tables into out/tables.md and its rows into out/rows.json; returns the tables. A table is
    written where some model ran its experiment, with the models that did."""
    saved = rows
    rows = with_seeds(rows)
    one_seed = [r for r in rows if r["seed"] == "-"]
    domains = values_of(rows, "pruned", "domain")
    smallest = (fractions_of(rows, "merge") or fractions_of(rows, "composition") or [0.0])[-1]
    n_seeds = len({r["seed"] for r in rows if r["experiment"] == "pruned"})
    over = f"mean ± half the range over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    sections = [  # (experiment, which rows, title, its table from those rows and the models that ran it)
        ("pruned", rows, "Pruned as is (inf) and fine-tuned (ft), against the model trained from scratch of the "
         f"subset's size (average over domains: loss (task accuracy); {over})",
         lambda rows, models: pruned_table(rows, models, values_of(rows, "baseline", "model"))),
        ("merge", rows, f"A fine-tuned {smallest:.1%} subset merged back into its full model (its domain; the merged "
         f"model's loss on the other domains against the full model's; {over})", merge_table),
        ("methods", one_seed, "Selection methods (one seed; average over domains: loss (task accuracy))",
         method_table),
        ("calibration", one_seed, f"Calibration size ({smallest:.1%}; one model seed; mean ± half the range over the "
         "calibration seeds, which draw documents and passages; the n-shot row: the same examples without their "
         "few-shot prompt)", calibration_table),
        ("composition", one_seed, f"Composition, this project's extension ({smallest:.1%} per domain; one seed; loss "
         "change from the full model)", composition_table),
        ("cross", one_seed, f"Each domain's {smallest:.1%} subset on every domain (one seed; loss change from the "
         "full model)", lambda rows, models: [line for m in models for line in cross_table(rows, m, domains) + [""]]),
        ("retention", rows, "The twins' retention (average over domains: loss (task accuracy), mean ± half the "
         "range of the seeds), routing token by token and with document pools", lambda rows, _: retention_table(rows)),
    ]
    text = "".join(f"## {title}\n\n" + "\n".join(table(chosen, values_of(chosen, experiment, "model"))) + "\n\n"
                   for experiment, chosen, title, table in sections if values_of(chosen, experiment, "model"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(saved, f, indent=1)
    return text


def read_rows(folders):
    """The rows of paper.py runs: each folder's rows.json, in order."""
    rows = []
    for folder in folders:
        path = os.path.join(folder, "rows.json")
        if not os.path.exists(path):
            raise UserError(f"no rows at {path}: run `python -m experiments.paper run` first")
        with open(path) as f:
            rows += json.load(f)
    return rows


# ---------------------------------------------------------------------------------------------------------
# scripts/table3.sh's table: the paper's Table 3 and Figure 3 from eval.py's results under --protocol emo.

def read_scores(path):
    """{benchmark: result} of an eval.py --out file of one model."""
    with open(path) as f:
        [results] = json.load(f).values()
    return results


def table3_scores(folder):
    """{model: {keep: {variant: {category: acc_raw}}}}: the full model's (keep 'all', 'inf') from full.json, each
    pruned model's from keepK/CATEGORY.scores.json (inf) and CATEGORY-ft.scores.json (ft)."""
    scores = {}
    for model in sorted(os.listdir(folder)):
        full = os.path.join(folder, model, "full.json")
        if not os.path.exists(full):
            continue
        parts = read_scores(full)["mmlu_cats"]["parts"]
        scores[model] = {"all": {"inf": {c: r["acc_raw"] for c, r in parts.items()}}}
        for keep_folder in sorted(os.listdir(os.path.join(folder, model))):
            if not keep_folder.startswith("keep"):
                continue
            keep = int(keep_folder.removeprefix("keep"))
            for name in os.listdir(os.path.join(folder, model, keep_folder)):
                if not name.endswith(".scores.json"):
                    continue
                category = name.removesuffix(".scores.json").removesuffix("-ft")
                variant = "ft" if name.endswith("-ft.scores.json") else "inf"
                result = read_scores(os.path.join(folder, model, keep_folder, name))[f"mmlu_cat_{category}"]
                scores[model].setdefault(keep, {}).setdefault(variant, {})[category] = result["acc_raw"]
    if not scores:
        raise UserError(f"no results in {folder}: run scripts/table3.sh")
    return scores


def category_mean(accuracies):
    """The paper's MMLU: the unweighted mean over the categories scored but "other"."""
    return mean([a for c, a in accuracies.items() if c != "other"])


def write_table3(folder, out):
    """table3.md (the 16-category mean per model, experts kept and variant; then every category) and figure3.png
    (the mean as is against the experts kept) from scripts/table3.sh's folder; returns the table."""
    scores = table3_scores(folder)
    models = list(scores)
    keeps = sorted({k for s in scores.values() for k in s if k != "all"}) + ["all"]
    lines = ["MMLU, the mean of the 16 categories but \"other\" (acc_raw, %), the EMO paper's protocol:", "",
             "| experts kept | " + " | ".join(f"{m} inf | {m} ft" for m in models) + " |",
             "|---" * (1 + 2 * len(models)) + "|"]
    for keep in keeps:
        cells = []
        for m in models:
            for variant in ("inf", "ft"):
                accuracies = scores[m].get(keep, {}).get(variant)
                cells.append(f"{100 * category_mean(accuracies):.1f}" if accuracies else "")
        lines.append(f"| {keep} | " + " | ".join(cells) + " |")
    categories = list(scores[models[0]]["all"]["inf"])
    lines += ["", "Per category (acc_raw, %, as is / fine-tuned):", "",
              "| model | experts kept | " + " | ".join(categories) + " |", "|---|---" + "|---" * len(categories) + "|"]
    for m in models:
        for keep in keeps:
            variants = scores[m].get(keep, {})
            cells = [" / ".join(f"{100 * variants[v][c]:.1f}" for v in ("inf", "ft") if c in variants.get(v, {}))
                     for c in categories]
            lines.append(f"| {m} | {keep} | " + " | ".join(cells) + " |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table3.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in models:
        points = [(k, category_mean(scores[m][k]["inf"])) for k in keeps if "inf" in scores[m].get(k, {})]
        ax.plot([128 if k == "all" else k for k, _ in points], [100 * a for _, a in points], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts kept (of 128)")
    ax.set_ylabel("MMLU, 16-category mean (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "figure3.png"), dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combine", default="", help="sweep folders of different models, comma-separated")
    parser.add_argument("--seeds", default="", help="sweep folders of the same experiment, comma-separated")
    parser.add_argument("--curves", default="", help="training run folders (history.json), comma-separated")
    parser.add_argument("--paper", default="", help="folders of paper.py's rows, comma-separated")
    parser.add_argument("--table3", default="", help="scripts/table3.sh's folder of eval.py results")
    parser.add_argument("--out", required=True, help="--combine, --curves, --paper, --table3: a folder; --seeds: "
                        "the table's file")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.combine, args.seeds, args.curves, args.paper, args.table3))) != 1:
        raise UserError("give one of --combine, --seeds, --curves, --paper and --table3")
    if args.table3:
        print(write_table3(args.table3, args.out))
        return
    if args.paper:
        print(write_paper(read_rows(args.paper.split(",")), args.out))
        return
    if args.combine:
        print(combine(args.combine.split(","), args.out))
        return
    if args.curves:
        runs = {os.path.basename(os.path.normpath(run)): run for run in args.curves.split(",")}
        for run in runs.values():
            if not os.path.exists(os.path.join(run, "history.json")):
                raise UserError(f"no training history at {os.path.join(run, 'history.json')}")
        os.makedirs(args.out, exist_ok=True)
        plot_training(runs, os.path.join(args.out, "training_curves.png"))
        print(f"wrote {args.out}/training_curves.png")
        return
    _, table = spread_table(args.seeds.split(","))
    print(table)
    with open(args.out, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    run_command(main)
