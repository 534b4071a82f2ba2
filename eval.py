"""
Per-domain quality of a model on held-out text: loss, perplexity and next-token accuracy, routing token by
token (no pool), as the release does at inference; and, with --sweep, the paper's experiment: prune each
model for each domain at several fractions of experts kept (prune.py), then measure loss, next-token accuracy
and task accuracy (tasks.py), and write the retention table and plots (report.py).

    python eval.py --ckpt out/emo_tiny                                  # the built-in corpus's domains
    python eval.py --ckpt out/pruned/emo_tiny/python-keep8-greedy.pt
    python eval.py --ckpt out/emo_tiny --data my_eval/                  # your own text (data/user.py)
    python eval.py --sweep --ckpt out/emo_tiny,out/std_tiny --keep 1.0,0.5,0.25,0.125 --out out/sweep_tiny
    python eval.py --sweep --ckpt out/emo_tiny,out/std_tiny --calib notes=my_calib/ --data notes=my_eval/
    python eval.py --curves --ckpt out/emo_tiny,out/std_tiny --out out/sweep_tiny     # training curves

Evaluation text is laid back to back (each document closed by its EOS) and cut into windows of seq_len + 1
tokens, every token predicted once; the last window is padded and its padding ignored; tokens that are not
scored (the prompt of a prompt/answer example) are context only. In the sweep, a built-in domain is pruned
with task demonstrations from its calibration documents and evaluated on its validation documents (16,384
tokens) and on task items made from them; a user domain (--calib NAME=PATH with --data NAME=PATH) is pruned
with its --calib text and evaluated on its --data text, with task items made from its --data documents when
there are enough.
"""

import argparse
import copy
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import checkpoint_path, checkpoint_tokenizer, is_hf_checkpoint, load_model, model_name
from data.corpus import Corpus
from data.user import read_examples, tokenize_examples
from errors import UserError, run_command
from prune import METHODS, corpus_calibration, expert_scores, parse_keep, prune, user_calibration
from report import plot_training, write_sweep
from tasks import task_accuracy, task_items


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
            _, _, stats = model(xb, yb, token_routing=True)  # the loss a chunk of logits at a time (lm_loss.py)
        scored = (yb != -1).sum().double()
        correct = (stats["lm_accuracy"].double() * scored).round()  # a count again (float32 mean x count)
        sums += torch.stack([stats["lm_loss"].double() * scored, correct, scored])
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


@dataclass
class Domain:
    """What the sweep needs of one domain: calibration batches, evaluation tokens, task items."""
    name: str
    calibration: list  # [(idx (1, T), scored (1, T))]
    tokens: np.ndarray  # (n,) evaluation text, documents back to back
    scored: np.ndarray = None  # (n,) bool, None: every token
    items: list = field(default_factory=list)  # tasks.Item


def corpus_domains(corpus, calib_docs, max_tokens):
    """The built-in corpus's domains: task demonstrations to calibrate, validation documents to evaluate."""
    return [Domain(d, corpus_calibration(corpus, d, calib_docs), corpus.domain_tokens("val", d)[:max_tokens + 1],
                   items=task_items(corpus.documents("val", d))) for d in corpus.domains]


def named_paths(spec, flag):
    """'name=path,name2=path2' (or one bare path, named by its file or folder) -> {name: path}."""
    named = {}
    for part in spec.split(","):
        name, _, path = part.rpartition("=")
        named[name or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]] = path
    if not all(named):
        raise UserError(f"{flag} {spec!r}: give NAME=PATH pairs")
    return named


def text_tokens(path, encoding, cfg):
    """Evaluation text of the user's files: (tokens (n,), scored (n,), documents [token arrays])."""
    tokenized = tokenize_examples(read_examples(path), encoding, cfg.eos_id, cfg.vocab_size)
    documents = [tokens for tokens, scored in tokenized if scored.all()]
    return np.concatenate([t for t, _ in tokenized]), np.concatenate([s for _, s in tokenized]), documents


def user_domains(calib_spec, data_spec, encoding, cfg, calib_docs, max_tokens):
    """User domains: each NAME pruned with --calib's NAME text and evaluated on --data's NAME text."""
    calib, data = named_paths(calib_spec, "--calib"), named_paths(data_spec, "--data")
    if set(calib) != set(data):
        raise UserError(f"--calib names {sorted(calib)} and --data names {sorted(data)} differ: each domain needs "
                        "both calibration and evaluation text")
    domains = []
    for name in data:
        tokens, scored, documents = text_tokens(data[name], encoding, cfg)
        domains.append(Domain(name, user_calibration(calib[name], encoding, cfg, calib_docs),
                              tokens[:max_tokens + 1], scored[:max_tokens + 1], task_items(documents)))
    return domains


@torch.no_grad()
def expert_usage(model, domains):
    """Mean router probability of each routed expert on each domain's evaluation tokens (full model, token
    routing): (n_domains, n_layer, Er). Domain-specific rows are EMO's semantic specialisation."""
    usage = []
    for domain in domains:
        tokens = torch.from_numpy(np.asarray(domain.tokens, dtype=np.int64))
        windows = [(w[None], torch.ones(1, len(w), dtype=torch.bool)) for w in tokens.split(model.cfg.seq_len)]
        usage.append(torch.stack(expert_scores(model, windows, "global")))  # windows unpadded: no padding counted
    return torch.stack(usage)


def evaluate_domain(model, domain, batch_size, device):
    """Loss, perplexity, next-token accuracy and task accuracy of one model on one domain."""
    x, y = domain_windows(domain.tokens, model.cfg.seq_len, len(domain.tokens), domain.scored)
    result = summarize(evaluate_windows(model, x, y, batch_size, device))
    result["task_accuracy"] = task_accuracy(model, domain.items, 4 * batch_size, device)
    result["task_items"] = len(domain.items)
    return result


def sweep(models, domains, fractions, method, batch_size, device):
    """Prune every model for every domain at every kept fraction (calibrating on the domain's calibration
    examples) and evaluate it on the domain's evaluation text and task. Returns result rows, with changes
    relative to the full model, and {model name: expert usage}."""
    rows = []
    jobs = [(name, domain) for name in models for domain in domains]
    for name, domain in tqdm(jobs, desc="sweep (model x domain)"):
        full = models[name]
        base = None
        for fraction in sorted(fractions, reverse=True):  # 1.0 first: the reference for the changes
            keep = parse_keep(repr(float(fraction)), full.cfg.n_experts, full.cfg.n_shared)
            model = full
            if keep < full.cfg.n_experts:  # pruning slices a copy; the full model serves every domain
                model = copy.deepcopy(full)
                prune(model, domain.calibration, keep, method)
            result = evaluate_domain(model, domain, batch_size, device)
            base = base or result
            rows.append({"model": name, "domain": domain.name, "keep": keep, "fraction": fraction, **result,
                         "d_loss": result["loss"] - base["loss"], "d_loss_rel": result["loss"] / base["loss"] - 1,
                         "d_accuracy": result["accuracy"] - base["accuracy"],
                         "d_task_accuracy": result["task_accuracy"] - base["task_accuracy"]})
    usage = {name: expert_usage(model, domains) for name, model in models.items()}
    return rows, usage


def print_results(name, model, results):
    print(f"{name}: {model.cfg.n_experts} experts, top {model.cfg.top_k}")
    print(f"{'domain':<12}{'loss':>8}{'ppl':>10}{'accuracy':>10}{'tokens':>9}")
    for domain, r in results.items():
        print(f"{domain:<12}{r['loss']:>8.3f}{r['perplexity']:>10.2f}{r['accuracy']:>10.1%}{r['tokens']:>9}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--init_from", dest="ckpt", required=True,
                        help="checkpoint(s), comma-separated: files, run directories, Hugging Face folders or hub ids")
    parser.add_argument("--data_dir", default="data/multidomain", help="the built-in corpus")
    parser.add_argument("--data", default="", help="your own evaluation text: PATH, or NAME=PATH,... for a sweep")
    parser.add_argument("--calib", default="", help="sweep over your own domains: NAME=PATH,... calibration text")
    parser.add_argument("--tokenizer", default="", help="for --data when the checkpoint records none")
    parser.add_argument("--max_tokens", type=int, default=16384, help="evaluation tokens per domain")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="prune + evaluate every domain at every --keep")
    parser.add_argument("--curves", action="store_true", help="plot the runs' training curves (history.json)")
    parser.add_argument("--keep", default="1.0,0.5,0.25,0.125", help="fractions of experts kept (sweep)")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--calib_docs", type=int, default=16, help="calibration examples per domain (sweep)")
    parser.add_argument("--out", default="out/sweep", help="where the sweep writes its table and plots")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    paths = args.ckpt.split(",")
    device = torch.device(args.device)
    if args.curves:
        os.makedirs(args.out, exist_ok=True)
        plot_training({model_name(path): path for path in paths}, os.path.join(args.out, "training_curves.png"))
        print(f"wrote {args.out}/training_curves.png")
        return
    for path in paths:  # fail before any work on a missing checkpoint
        if not is_hf_checkpoint(path):
            checkpoint_path(path)
    if args.sweep and bool(args.calib) != bool(args.data):
        raise UserError("a sweep over your own text needs both --calib NAME=PATH and --data NAME=PATH")
    fractions = [float(f) for f in args.keep.split(",")]
    if args.sweep and 1.0 not in fractions:
        raise UserError("--keep must include 1.0: the changes are relative to the full model")
    loaded = {model_name(path): load_model(path, device) for path in paths}
    models = {name: model for name, (model, _) in loaded.items()}
    first, first_ckpt = next(iter(loaded.values()))
    if args.sweep and any((m.cfg.vocab_size, m.cfg.eos_id) != (first.cfg.vocab_size, first.cfg.eos_id)
                          for m in models.values()):
        raise UserError("the models of a sweep must share a vocabulary and EOS: they are evaluated on the same tokens")
    corpus = None
    if not args.data:
        corpus = Corpus(args.data_dir)
        for model in models.values():
            corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
    if args.sweep:
        if corpus is not None:
            domains = corpus_domains(corpus, args.calib_docs, args.max_tokens)
        else:  # the models of a sweep share the first one's tokenizer
            encoding = checkpoint_tokenizer(first_ckpt, args.tokenizer, paths[0])
            domains = user_domains(args.calib, args.data, encoding, first.cfg, args.calib_docs, args.max_tokens)
        rows, usage = sweep(models, domains, fractions, args.method, args.batch_size, device)
        print(write_sweep(rows, usage, [d.name for d in domains], args.out))
        print(f"wrote {args.out}/table.md, results.csv, results.json, retention_{{loss,accuracy,task_accuracy}}.png, "
              "expert_usage.png")
        return
    for name, (model, ckpt) in loaded.items():
        if corpus is not None:
            results = evaluate_domains(model, corpus, "val", model.cfg.seq_len, args.batch_size, args.max_tokens,
                                       device)
        else:
            results = {}
            encoding = checkpoint_tokenizer(ckpt, args.tokenizer, name)
            for domain, path in named_paths(args.data, "--data").items():
                tokens, scored, _ = text_tokens(path, encoding, model.cfg)
                x, y = domain_windows(tokens, model.cfg.seq_len, args.max_tokens, scored)
                results[domain] = summarize(evaluate_windows(model, x, y, args.batch_size, device))
        print_results(name, model, results)


if __name__ == "__main__":
    run_command(main)
