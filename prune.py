"""
Selective expert use (docs/method.md, "Selective expert use"): run a model on a few calibration examples of
one domain, score every routed expert of every layer, keep the best and slice the rest away, so that the
model written is physically smaller. The shared expert is always kept and counts in --keep; top_k becomes
min(top_k, kept).

    python prune.py --ckpt out/emo_tiny --domain python --keep 0.125           # 8 of 64 experts per layer
    python prune.py --ckpt out/emo_tiny --domain math --keep 16 --method global --calib_docs 1
    python prune.py --ckpt out/emo_tiny --calib my_notes/ --domain notes --keep 0.25     # your own text

Calibration examples: for a domain of the built-in corpus (--domain, --data_dir), task demonstrations made
from its calibration documents (tasks.py: a passage and its true continuation, the continuation's tokens
scored); for your own text (--calib PATH: a text file, a folder or glob of them, or JSON Lines with "text" or
"prompt"/"answer"; data/user.py), every token of a document or the answer's tokens of a demonstration,
tokenized with the checkpoint's tokenizer (or --tokenizer). --calib_docs caps how many examples are used.
--keep is a fraction of the original model's experts (with a decimal point: 0.25, 1.0) or a count (16).
Methods (scores per routed expert, averaged over the scored calibration tokens):
    greedy     the release's default: layers in order, layer l scored by its mean router probability with
               layers < l already pruned
    global     mean router probability, all layers from one pass of the full model; the layers share the
               budget (keep x n_layer experts in all), so their counts may differ, as the release's global method
    frequency  how often the expert is among a token's top-k
    easy_ep    EASY-EP: routing weight x expert output norm x (1 - cos(h, h + moe_out)), h the MoE input
    random     a random choice (a control)
Writes OUT.pt (a checkpoint like any other: eval.py evaluates it, train.py fine-tunes it with
--init_from=OUT.pt, sample.py samples from it; it keeps the tokenizer) and OUT.json, the experts kept per
layer (original ids) and their scores; with --hf_out, also the Hugging Face format (config.json with
num_experts_per_layer, pruning.json with the original ids, tokenizer.json). --ckpt takes the release's
checkpoints too:
    python prune.py --init_from path/to/Emo_1b14b_1T --calib my.txt --domain mine --keep 0.125 --hf_out out/mine
"""

import argparse
import dataclasses
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import checkpoint_tokenizer, load_model, model_name, recorded_tokenizer, save_checkpoint
from data.corpus import Corpus
from data.user import example_batches, read_examples, tokenize_examples
from errors import UserError, run_command
from hf import export_hf
from kernels import swiglu
from tasks import ANSWER, PASSAGE, demonstrations

METHODS = ("greedy", "global", "frequency", "easy_ep", "random")


def parse_keep(text, n_original, n_shared):
    """'0.125' (a fraction of the original experts) or '4' (a count) -> experts to keep, shared included."""
    if "." in text:
        fraction = float(text)
        if not 0 < fraction <= 1:
            raise UserError(f"--keep {text}: a fraction must be in (0, 1]")
        keep = round(fraction * n_original)
    else:
        keep = int(text)
    if keep < 1:
        raise UserError(f"--keep {text} keeps {keep} experts: at least 1 is needed")
    if keep <= n_shared:
        raise UserError(f"--keep {text} keeps {keep} experts, no more than the {n_shared} shared: "
                        "keep at least one routed expert")
    if keep > n_original:
        raise UserError(f"--keep {text}: the model has only {n_original} experts")
    return keep


def corpus_calibration(corpus, domain, n):
    """n task demonstrations of a built-in domain (tasks.py), from its calibration documents:
    [(idx (1, T), scored (1, T))]."""
    demos = demonstrations(corpus.documents("calib", domain), n)
    if not demos:
        raise UserError(f"domain {domain!r} has no calibration document long enough for a demonstration "
                        f"({PASSAGE + ANSWER + 1} tokens)")
    return demos


def user_calibration(path, encoding, cfg, n):
    """The first n calibration batches of the user's text (data/user.py), tokenized with encoding."""
    tokenized = tokenize_examples(read_examples(path), encoding, cfg.eos_id, cfg.vocab_size)
    return example_batches(tokenized, cfg.seq_len)[:n]


def stack_equal_lengths(batches, rows=16):
    """Consecutive batches [(idx (1, T), scored (1, T))] of equal T stacked up to rows at a time: [(idx (b, T),
    scored (b, T))]. With token routing each sequence is computed on its own, so the scores are the same, in
    fewer, larger passes (task demonstrations all have one length, documents' windows all but the last)."""
    groups = []  # runs of consecutive batches of one length, at most rows each
    for batch in batches:
        if groups and groups[-1][0][0].shape[1] == batch[0].shape[1] and len(groups[-1]) < rows:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [(torch.cat([idx for idx, _ in group]), torch.cat([scored for _, scored in group])) for group in groups]


@torch.no_grad()
def expert_scores(model, batches, method):
    """Score every routed expert of every layer on the calibration batches [(idx (1, T), scored (1, T))], the
    mean over the scored tokens: a list of (Er,) tensors."""
    captured = {}  # per layer: the MoE's (input, output, routing)
    hooks = [block.moe.register_forward_hook(lambda module, args, out, i=i: captured.__setitem__(i, (args[0], *out)))
             for i, block in enumerate(model.layers)]
    device = model.embed.weight.device
    totals = [torch.zeros(block.moe.router.n_routed, device=device) for block in model.layers]
    n_tokens = 0
    try:
        for idx, scored in stack_equal_lengths(batches):
            model.hidden_states(idx.to(device), token_routing=True)  # the hooks capture what is scored
            scored = scored.flatten().to(device)
            n_tokens += int(scored.sum())
            for i, block in enumerate(model.layers):
                totals[i] += layer_score(block.moe, *captured[i], scored, method)
    finally:
        for hook in hooks:
            hook.remove()
    return [t.cpu() / max(n_tokens, 1) for t in totals]


def layer_score(moe, moe_input, moe_output, routing, scored, method):
    """Summed score over one batch's scored tokens for each routed expert of one layer: (Er,). moe_input is
    the MoE's input (after its RMSNorm), moe_output what it adds to the residual stream, scored (N,) bool."""
    router = moe.router
    h = moe_input.flatten(0, 1)[scored]  # (n, C) the scored tokens
    if method in ("greedy", "global"):
        return router.logits(h).softmax(-1).sum(0)
    kr = router.k_routed
    chosen, weights = routing.experts[scored, :kr], routing.weights[scored, :kr]  # (n, kr)
    if method == "frequency":
        return torch.zeros(router.n_routed, device=h.device).index_add_(0, chosen.flatten(),
                                                                         (weights > 0).flatten().float())
    # EASY-EP: how much the MoE changes the token's direction (h: the MoE input after its norm, as in the
    # release), times each expert's weighted output norm
    # 1 - cos(a, b) as |a/|a| - b/|b||^2 / 2: the same value, but no cancellation when the MoE adds little
    moe_output = moe_output.flatten(0, 1)[scored]  # (n, C)
    direction_change = F.normalize(h.float(), dim=-1) - F.normalize((h + moe_output).float(), dim=-1)
    importance = direction_change.square().sum(-1) / 2  # (N,)
    scores = torch.zeros(router.n_routed, device=h.device)
    for e in range(router.n_routed):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        if len(token):
            out = swiglu(h[token] @ moe.w_up_gate[e]) @ moe.w_down[e]  # (n_e, C)
            scores[e] = (weights[token, slot] * out.float().norm(dim=-1) * importance[token].float()).sum()
    return scores


def prune_layer(moe, routed_ids):
    """Keep the routed experts routed_ids (sorted, layer-local) and the shared ones; slice the rest away."""
    router = moe.router
    keep = torch.cat([routed_ids, torch.arange(router.n_routed, router.n_routed + router.n_shared)])
    keep = keep.to(router.gate.weight.device)
    gate = nn.Linear(router.gate.in_features, len(keep), bias=False, device="meta")
    gate.weight = nn.Parameter(router.gate.weight.data[keep].clone())
    router.gate = gate  # a new Linear: in_features/out_features describe the sliced weight
    moe.w_up_gate = nn.Parameter(moe.w_up_gate.data[keep].clone())
    moe.w_down = nn.Parameter(moe.w_down.data[keep].clone())
    router.n_routed = len(routed_ids)
    router.k_routed = min(router.k_routed, len(routed_ids))


def routed_counts_across_layers(all_scores, n_routed_total):
    """How many routed experts each layer keeps when the best n_routed_total of all layers' experts are
    kept together (the global method): every layer keeps at least one, then the highest scores win."""
    counts = [1] * len(all_scores)
    rest = torch.cat([s.sort(descending=True).values[1:] for s in all_scores])  # each layer's best is taken
    layer_of = torch.cat([torch.full((len(s) - 1,), i) for i, s in enumerate(all_scores)])
    for i in layer_of[rest.argsort(descending=True, stable=True)[:n_routed_total - len(all_scores)]].tolist():
        counts[i] += 1
    return counts


def prune(model, batches, keep, method, seed=0):
    """Prune model in place to keep experts per layer (shared included); 'global' keeps that many on
    average, the layers sharing the budget by score (so counts may differ between layers, as the release's
    global method). Returns, per layer, the kept routed experts (layer-local ids before pruning) and every
    routed expert's score."""
    n_shared, n_layer = model.cfg.n_shared, model.cfg.n_layer
    routed_counts = [keep - n_shared] * n_layer
    if method in ("global", "frequency", "easy_ep"):
        all_scores = expert_scores(model, batches, method)
        if method == "global":
            routed_counts = routed_counts_across_layers(all_scores, n_layer * (keep - n_shared))
    layers = []
    for i, block in enumerate(model.layers):
        if method == "random":
            scores = torch.rand(block.moe.router.n_routed, generator=torch.Generator().manual_seed(seed + i))
        elif method == "greedy":  # scored with the layers before it already pruned
            scores = expert_scores(model, batches, method)[i]
        else:
            scores = all_scores[i]
        kept = scores.topk(routed_counts[i]).indices.sort().values
        layers.append({"kept": kept.tolist(), "scores": [round(s, 6) for s in scores.tolist()]})
        prune_layer(block.moe, kept)  # before the next layer is scored (what makes greedy layer-wise)
    sizes = [n + n_shared for n in routed_counts]
    uniform = len(set(sizes)) == 1
    model.cfg = dataclasses.replace(model.cfg, n_experts=max(sizes), top_k=min(model.cfg.top_k, max(sizes)),
                                    experts_per_layer=() if uniform else tuple(sizes))
    return layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--init_from", dest="ckpt", required=True,
                        help="checkpoint: file, run directory, Hugging Face folder or hub id")
    parser.add_argument("--domain", default="", help="a domain of the built-in corpus, or the name of --calib's")
    parser.add_argument("--calib", default="", help="your own calibration text: file, folder, glob or .jsonl")
    parser.add_argument("--tokenizer", default="", help="for --calib when the checkpoint records none: gpt2, "
                        "cl100k_base, dolma2, a rank file or a tokenizer.json")
    parser.add_argument("--keep", required=True, help="fraction of the original experts (0.125) or a count (8)")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--calib_docs", type=int, default=16, help="calibration examples used")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--seed", type=int, default=0, help="for --method random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="output path without extension "
                        "(default: out/pruned/MODEL/DOMAIN-keepK-METHOD)")
    parser.add_argument("--hf_out", default="", help="also export the pruned model in Hugging Face format here")
    args = parser.parse_args(argv)
    # every check before any work or writing
    if not args.domain and not args.calib:
        raise UserError("give --domain (a domain of the built-in corpus) or --calib PATH (your own text)")
    if args.calib_docs < 1:
        raise UserError(f"--calib_docs {args.calib_docs}: at least one calibration example is needed")
    model, ckpt = load_model(args.ckpt, args.device)
    domain = args.domain or os.path.splitext(os.path.basename(os.path.normpath(args.calib)))[0]
    previous = ckpt.get("pruning")
    n_original = previous["original_n_experts"] if previous else model.cfg.n_experts
    keep = parse_keep(args.keep, n_original, model.cfg.n_shared)
    if previous and previous["domain"] != domain:
        raise UserError(f"{args.ckpt} is already pruned for {previous['domain']!r}: prune the original model "
                        f"({previous['source']}) for {domain!r} instead")
    if keep > min(model.cfg.layer_experts()):
        raise UserError(f"{args.ckpt} keeps {min(model.cfg.layer_experts())} experts in a layer, it cannot keep {keep}")
    if args.calib:
        batches = user_calibration(args.calib, checkpoint_tokenizer(ckpt, args.tokenizer, args.ckpt), model.cfg,
                                   args.calib_docs)
    else:
        corpus = Corpus(args.data_dir)
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        batches = corpus_calibration(corpus, args.domain, args.calib_docs)
    layers = prune(model, batches, keep, args.method, args.seed)
    if previous:  # ids in the record always refer to the original model's experts
        for layer, before in zip(layers, previous["layers"]):
            layer["kept"] = [before["kept"][i] for i in layer["kept"]]
    record = {"domain": domain, "keep": keep, "original_n_experts": n_original, "method": args.method,
              "calibration": args.calib or f"{args.data_dir} calibration documents", "calib_examples": len(batches),
              "source": previous["source"] if previous else args.ckpt, "layers": layers}
    out = args.out or os.path.join("out", "pruned", model_name(args.ckpt), f"{domain}-keep{keep}-{args.method}")
    save_checkpoint(out + ".pt", {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
                                  "step": ckpt.get("step"), "pruning": record, "tokenizer": ckpt.get("tokenizer")})
    with open(out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    if args.hf_out:
        export_hf(model, args.hf_out, tokenizer=recorded_tokenizer(ckpt), pruning=record)
    total, active = model.num_params()
    print(f"kept {keep} of {n_original} experts per layer for {domain!r} ({args.method}, {len(batches)} "
          f"calibration examples): {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active -> {out}.pt, .json")


if __name__ == "__main__":
    run_command(main)
