"""
The paper's experiment (its retention figure): prune each model for each domain at several fractions of the
experts kept (prune.py), evaluate each pruned model on that domain's held-out text (eval.py: loss and
next-token accuracy) and task (tasks.py: task accuracy), and write the retention table and plots
(report.py), EMO against the standard MoE.

    python -m experiments.sweep --ckpt out/emo_tiny,out/std_tiny --keep 1.0,0.5,0.25,0.125 --out out/sweep_tiny
    python -m experiments.sweep --ckpt out/emo_tiny,out/std_tiny --calib notes=my_calib/ --data notes=my_eval/
    python -m experiments.sweep --ckpt out/emo_tiny --out out/sweeps/emo_tiny   # one model; report --combine joins

A built-in domain is pruned with task demonstrations from its calibration documents and evaluated on its
validation documents (16,384 tokens) and on task items made from them; a user domain (--calib NAME=PATH with
--data NAME=PATH) is pruned with its --calib text and evaluated on its --data text, with task items made from
its --data documents when there are enough. Every model is evaluated in full too (keep 1.0): the changes are
relative to it. The expert-usage heatmap is the full models' mean router probability per domain.
"""

import argparse
import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from calibration import corpus_calibration
from checkpoint import checkpoint_paths, checkpoint_tokenizer, load_model, model_name
from data.corpus import Corpus
from data.user import document_batches, evaluation_text, named_paths, user_batches
from errors import UserError, run_command
from eval import evaluate_text, set_pool_eval
from experiments.report import write_sweep
from prune import METHODS, expert_scores, keep_count, prune
from tasks import task_accuracy, task_items


@dataclass
class Domain:
    """What the sweep needs of one domain: calibration batches, evaluation tokens, task items."""
    name: str
    calibration: list  # [(idx (b, T), scored (b, T))]
    tokens: np.ndarray  # (n,) evaluation text, documents back to back
    scored: np.ndarray = None  # (n,) bool, None: every token
    items: list = field(default_factory=list)  # tasks.Item


def corpus_domains(corpus, calib_docs, max_tokens):
    """The built-in corpus's domains: task demonstrations to calibrate, validation documents to evaluate."""
    return [Domain(d, corpus_calibration(corpus, d, calib_docs), corpus.domain_tokens("val", d)[:max_tokens + 1],
                   items=task_items(corpus.documents("val", d)))
            for d in corpus.domains]


def user_domains(calib_spec, data_spec, encoding, cfg, calib_docs, max_tokens):
    """User domains: each NAME pruned with --calib's NAME text and evaluated on --data's NAME text."""
    calib, data = named_paths(calib_spec, "--calib"), named_paths(data_spec, "--data")
    if set(calib) != set(data):
        raise UserError(f"--calib names {sorted(calib)} and --data names {sorted(data)} differ: each domain needs "
                        "both calibration and evaluation text")
    domains = []
    for name in data:
        tokens, scored, documents = evaluation_text(data[name], encoding, cfg)
        domains.append(Domain(name, user_batches(calib[name], encoding, cfg, calib_docs),
                              tokens[:max_tokens + 1], scored[:max_tokens + 1], task_items(documents)))
    return domains


@torch.no_grad()
def expert_usage(model, domains):
    """Mean router probability of each routed expert on each domain's evaluation tokens (full model, token
    routing): (n_domains, n_layer, Er). Domain-specific rows are EMO's semantic specialisation."""
    return torch.stack([torch.stack(expert_scores(model, document_batches(d.tokens, model.cfg.seq_len), "global"))
                        for d in domains])


def evaluate_domain(model, domain, batch_size, device):
    """Loss, perplexity, next-token accuracy and task accuracy of one model on one domain."""
    result = evaluate_text(model, domain.tokens, batch_size, device, domain.scored)
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
            keep = keep_count(fraction, full.cfg.n_experts, full.cfg.n_shared)
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


def fraction_list(text):
    """'1.0,0.5' -> (1.0, 0.5); anything else a one-line error."""
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise UserError(f"{text!r}: give fractions such as 1.0,0.5,0.25") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", dest="paths", type=checkpoint_paths, required=True,
                        help="checkpoints, comma-separated: files, run directories, Hugging Face folders or hub ids")
    parser.add_argument("--data_dir", default="data/multidomain", help="the built-in corpus")
    parser.add_argument("--calib", default="", help="your own domains: NAME=PATH,... calibration text")
    parser.add_argument("--data", default="", help="your own domains: NAME=PATH,... evaluation text")
    parser.add_argument("--tokenizer", default="", help="for --calib/--data when the checkpoint records none")
    parser.add_argument("--keep", default="1.0,0.5,0.25,0.125", help="fractions of experts kept, 1.0 included")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--calib_docs", type=int, default=16, help="calibration examples per domain")
    parser.add_argument("--max_tokens", type=int, default=16384, help="evaluation tokens per domain")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--pool_eval", type=int, default=None, help="evaluate with pools of this many experts "
                        "per document (0: token by token; default: the model's own)")
    parser.add_argument("--out", default="out/sweep", help="where the table and plots are written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    paths = args.paths
    if bool(args.calib) != bool(args.data):
        raise UserError("a sweep over your own text needs both --calib NAME=PATH and --data NAME=PATH")
    fractions = list(fraction_list(args.keep))
    if 1.0 not in fractions:
        raise UserError("--keep must include 1.0: the changes are relative to the full model")
    device = torch.device(args.device)
    loaded = {model_name(path): load_model(path, device) for path in paths}
    models = {name: model for name, (model, _) in loaded.items()}
    if args.pool_eval is not None:
        for model in models.values():
            set_pool_eval(model, args.pool_eval)
    first, first_ckpt = next(iter(loaded.values()))
    if any((m.cfg.vocab_size, m.cfg.eos_id) != (first.cfg.vocab_size, first.cfg.eos_id) for m in models.values()):
        raise UserError("the models of a sweep must share a vocabulary and EOS: they are evaluated on the same tokens")
    if args.data:  # the models of a sweep share the first one's tokenizer
        encoding = checkpoint_tokenizer(first_ckpt.get("tokenizer"), args.tokenizer, paths[0])
        domains = user_domains(args.calib, args.data, encoding, first.cfg, args.calib_docs, args.max_tokens)
    else:
        corpus = Corpus(args.data_dir)
        for model in models.values():
            corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        domains = corpus_domains(corpus, args.calib_docs, args.max_tokens)
    rows, usage = sweep(models, domains, fractions, args.method, args.batch_size, device)
    print(write_sweep(rows, usage, [d.name for d in domains], args.out))
    print(f"wrote {args.out}/table.md, results.csv, results.json, retention_{{loss,accuracy,task_accuracy}}.png, "
          "expert_usage.png")


if __name__ == "__main__":
    run_command(main)
