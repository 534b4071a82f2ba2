"""
Per-domain quality of a model on held-out documents: loss, perplexity and next-token accuracy, routing
token by token (no pool), as the release does at inference. With --sweep, the paper's experiment: prune
each model for each domain at several fractions of experts kept (prune.py), evaluate, and write the
retention table and curves (EMO vs the standard MoE) and a heatmap of expert usage per domain.

    python eval.py --ckpt out/emo_tiny
    python eval.py --ckpt out/emo_tiny/pruned/python-keep2-greedy.pt
    python eval.py --sweep --ckpt out/emo_tiny,out/std_tiny --keep 1.0,0.5,0.25,0.125 --out out/sweep_tiny
    python eval.py --curves --ckpt out/emo_tiny,out/std_tiny --out out/sweep_tiny     # training curves

A domain's validation documents are laid back to back and cut into windows of seq_len + 1 tokens (every
token is predicted once); the last window is padded and its padding ignored. Only validation documents
are scored; prune.py calibrates on the separate calibration documents.
"""

import argparse
import copy
import csv
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import checkpoint_path, is_hf_checkpoint, load_model, model_name
from data.corpus import Corpus
from errors import UserError, run_command
from prune import METHODS, calibration_batches, expert_scores, parse_keep, prune


def domain_windows(tokens, seq_len, max_tokens):
    """(n,) tokens -> inputs and targets (W, T) int64, at most max_tokens targets, padding targets -1."""
    tokens = np.asarray(tokens[:max_tokens + 1], dtype=np.int64)
    n_targets = len(tokens) - 1
    n_windows = math.ceil(n_targets / seq_len)
    x = np.zeros((n_windows, seq_len), dtype=np.int64)
    y = np.full((n_windows, seq_len), -1, dtype=np.int64)
    for w in range(n_windows):
        chunk = tokens[w * seq_len:(w + 1) * seq_len + 1]
        x[w, :len(chunk) - 1] = chunk[:-1]
        y[w, :len(chunk) - 1] = chunk[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def evaluate_windows(model, x, y, batch_size, device, autocast_dtype=torch.float32):
    """Summed loss, correct predictions and scored tokens over windows (W, T), as a tensor of 3.
    Under torch.distributed the windows are shared out and the sums all-reduced; every rank runs the same
    number of forward passes (empty batches where it has none left), as FSDP needs."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n_batches = math.ceil(len(x) / (batch_size * world))
    for b in range(n_batches):
        rows = slice((b * world + rank) * batch_size, (b * world + rank + 1) * batch_size)
        xb, yb = x[rows].to(device), y[rows].to(device)
        if len(xb) == 0:  # nothing left for this rank: a dummy pass with nothing scored
            xb, yb = x[:1].to(device), torch.full_like(x[:1], -1).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            logits, _, _ = model(xb, token_routing=True)
        scored = yb != -1
        loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), ignore_index=-1, reduction="sum")
        correct = ((logits.argmax(-1) == yb) & scored).sum()
        sums += torch.stack([loss.double(), correct.double(), scored.sum().double()])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return sums


def summarize(sums):
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": correct / max(count, 1),
            "tokens": int(count)}


def evaluate_domains(model, corpus, split, seq_len, batch_size, max_tokens, device, autocast_dtype=torch.float32,
                     domains=None):
    """{domain: {loss, perplexity, accuracy, tokens}} on the first max_tokens tokens of each domain's split."""
    results = {}
    for domain in domains or corpus.domains:
        x, y = domain_windows(corpus.domain_tokens(split, domain), seq_len, max_tokens)
        results[domain] = summarize(evaluate_windows(model, x, y, batch_size, device, autocast_dtype))
    return results



@torch.no_grad()
def expert_usage(model, corpus, max_tokens):
    """Mean router probability of each routed expert on each domain's validation tokens (full model, token
    routing): (n_domains, n_layer, Er). Domain-specific rows are EMO's semantic specialisation."""
    usage = []
    for domain in corpus.domains:
        tokens = torch.from_numpy(corpus.domain_tokens("val", domain)[:max_tokens].astype("int64"))
        windows = [w[None] for w in tokens.split(model.cfg.seq_len)]  # the last one shorter: no padding counted
        usage.append(torch.stack(expert_scores(model, windows, "global")))
    return torch.stack(usage)


def sweep(paths, corpus, fractions, method, calib_docs, max_tokens, batch_size, device):
    """Prune every model for every domain at every kept fraction (calibrating on the domain's calibration
    documents) and evaluate it on the domain's validation documents. Returns result rows, with changes
    relative to the full model, and {model name: expert usage}."""
    full_models = {model_name(path): load_model(path, device)[0] for path in paths}
    rows = []
    jobs = [(name, domain) for name in full_models for domain in corpus.domains]
    for name, domain in tqdm(jobs, desc="sweep (model x domain)"):
        full = full_models[name]
        batches = calibration_batches(corpus, domain, calib_docs, full.cfg.seq_len)
        base = None
        for fraction in sorted(fractions, reverse=True):  # 1.0 first: the reference for the changes
            keep = parse_keep(repr(float(fraction)), full.cfg.n_experts, full.cfg.n_shared)
            model = copy.deepcopy(full)
            if keep < full.cfg.n_experts:
                prune(model, batches, keep, method)
            result = evaluate_domains(model, corpus, "val", model.cfg.seq_len, batch_size, max_tokens, device,
                                      domains=[domain])[domain]
            base = base or result
            rows.append({"model": name, "domain": domain, "keep": keep, "fraction": fraction, **result,
                         "d_loss": result["loss"] - base["loss"], "d_loss_rel": result["loss"] / base["loss"] - 1,
                         "d_accuracy": result["accuracy"] - base["accuracy"]})
    usage = {name: expert_usage(model, corpus, max_tokens) for name, model in full_models.items()}
    return rows, usage


def averages(rows):
    """Rows averaged over domains: {(model, fraction): {loss, accuracy, d_loss, d_loss_rel, d_accuracy, keep}}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["fraction"]), []).append(r)
    keys = ("loss", "accuracy", "d_loss", "d_loss_rel", "d_accuracy")
    return {k: {**{key: sum(r[key] for r in g) / len(g) for key in keys}, "keep": g[0]["keep"]}
            for k, g in groups.items()}


def markdown_table(rows):
    """Average over domains per model and fraction kept, then the loss change per domain."""
    avg = averages(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    head = "| experts kept | " + " | ".join(f"{m} loss (change) | {m} accuracy (change)" for m in models) + " |"
    lines = ["Average over domains:", "", head, "|---" * (1 + 2 * len(models)) + "|"]
    for f in fractions:
        cells = []
        for m in models:
            a = avg[(m, f)]
            cells += [f"{a['loss']:.3f} ({a['d_loss']:+.3f}, {a['d_loss_rel']:+.1%})",
                      f"{a['accuracy']:.1%} ({100 * a['d_accuracy']:+.1f} pt)"]
        lines.append(f"| {avg[(models[0], f)]['keep']} ({f:.1%}) | " + " | ".join(cells) + " |")
    lines += ["", "Loss change per domain (pruned for that domain vs the full model):", "",
              "| model | experts kept | " + " | ".join(domains) + " |", "|---|---" + "|---" * len(domains) + "|"]
    by_key = {(r["model"], r["fraction"], r["domain"]): r for r in rows}
    for m in models:
        for f in fractions[1:]:
            lines.append(f"| {m} | {f:.1%} | " + " | ".join(f"{by_key[(m, f, d)]['d_loss']:+.3f}" for d in domains)
                         + " |")
    return "\n".join(lines)


def plot_retention(rows, path, metric):
    """Quality vs fraction of experts kept: one panel per domain and one for the average, a line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        ax.set_ylabel("validation " + metric)
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def plot_training(paths, path):
    """Training curves of runs from their history.json: LM loss per step and mean validation loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in paths:
        with open(os.path.join(run, "history.json")) as f:
            history = json.load(f)
        steps = [r["step"] for r in history]
        train_ax.plot(steps, [r["lm_loss"] for r in history], label=model_name(run), alpha=0.8)
        val = [(r["step"], sum(r["val"].values()) / len(r["val"])) for r in history if "val" in r]
        val_ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label=model_name(run))
    for ax, title in ((train_ax, "training LM loss"), (val_ax, "validation loss (mean over domains)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(rows, usage, domains, out_dir):
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
    plot_retention(rows, os.path.join(out_dir, "retention_loss.png"), "loss")
    plot_retention(rows, os.path.join(out_dir, "retention_accuracy.png"), "accuracy")
    plot_usage(usage, domains, os.path.join(out_dir, "expert_usage.png"))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--init_from", dest="ckpt", required=True,
                        help="checkpoint(s), comma-separated: files, run directories, Hugging Face folders or hub ids")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--max_tokens", type=int, default=16384, help="validation tokens per domain")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="prune + evaluate every domain at every --keep")
    parser.add_argument("--curves", action="store_true", help="plot the runs' training curves (history.json)")
    parser.add_argument("--keep", default="1.0,0.5,0.25,0.125", help="fractions of experts kept (sweep)")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--calib_docs", type=int, default=16)
    parser.add_argument("--out", default="out/sweep", help="where the sweep writes its table and plots")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    paths = args.ckpt.split(",")
    device = torch.device(args.device)
    if args.curves:
        os.makedirs(args.out, exist_ok=True)
        plot_training(paths, os.path.join(args.out, "training_curves.png"))
        print(f"wrote {args.out}/training_curves.png")
        return
    corpus = Corpus(args.data_dir)
    for path in paths:  # fail before any work on a missing checkpoint
        if not is_hf_checkpoint(path):
            checkpoint_path(path)
    if not args.sweep:
        for path in paths:
            model, _ = load_model(path, device)
            corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
            results = evaluate_domains(model, corpus, "val", model.cfg.seq_len, args.batch_size, args.max_tokens,
                                       device)
            print(f"{model_name(path)}: {model.cfg.n_experts} experts, top {model.cfg.top_k}")
            print(f"{'domain':<12}{'loss':>8}{'ppl':>10}{'accuracy':>10}{'tokens':>9}")
            for domain, r in results.items():
                print(f"{domain:<12}{r['loss']:>8.3f}{r['perplexity']:>10.2f}{r['accuracy']:>10.1%}{r['tokens']:>9}")
        return
    fractions = [float(f) for f in args.keep.split(",")]
    if 1.0 not in fractions:
        raise UserError("--keep must include 1.0: the changes are relative to the full model")
    rows, usage = sweep(paths, corpus, fractions, args.method, args.calib_docs, args.max_tokens, args.batch_size,
                        device)
    print(write_sweep(rows, usage, corpus.domains, args.out))
    print(f"wrote {args.out}/table.md, results.csv, results.json, retention_loss.png, retention_accuracy.png, "
          "expert_usage.png")


if __name__ == "__main__":
    run_command(main)
