"""
Selective expert use (docs/method.md, "Selective expert use"): run a model on a few calibration examples of
one domain, score every routed expert of every layer, keep the best and slice the rest away, so that the
model written is physically smaller. The shared expert is always kept and counts in --keep; top_k becomes
min(top_k, kept).

    python prune.py --ckpt out/emo_tiny --domain python --keep 0.125           # 8 of 64 experts per layer
    python prune.py --ckpt out/emo_tiny --domain math --keep 16 --method global --calib_docs 1
    python prune.py --ckpt out/emo_tiny --calib my_notes/ --domain notes --keep 0.25     # your own text
    python prune.py --ckpt out/emo_tiny --domain python,c --keep 0.125      # both domains' 8 experts, composed
    python prune.py --ckpt allenai/Emo_1b14b_1T --benchmark mmlu_stem --keep 16    # a benchmark's questions

Calibration examples come from a built-in domain (--domain), your own text (--calib) or a benchmark
(--benchmark): calibration.py says what each gives. --calib_docs caps how many are used.
--keep is a fraction of the original model's experts (with a decimal point: 0.25, 1.0) or a count (16).
Methods (scores per routed expert, averaged over the scored calibration tokens):
    greedy     the release's default: layers in order, layer l scored by its mean router probability with
               layers < l already pruned (streamed: each layer runs once)
    global     the release's: mean router probability, every layer from one pass of the full model, the same
               count kept in every layer
    global_budget   as global, but the layers share the budget (keep x n_layer experts in all) by score, so
               their counts may differ
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

from calibration import argument_texts, text_arguments, text_source, text_split
from checkpoint import load_model, model_config, model_name, save_checkpoint
from data.tokenizer import from_record
from errors import UserError, run_command
from files import atomic_write, check_target
from hf import export_hf
from kernels import swiglu
from model import eval_mode

METHODS = ("greedy", "global", "global_budget", "frequency", "easy_ep", "random")


def keep_count(keep, n_original, n_shared):
    """Experts to keep, shared included: keep is a fraction of the original experts (a float: 0.125, 1.0) or a
    count (an int: 8)."""
    count = round(keep * n_original) if isinstance(keep, float) else keep
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise UserError(f"--keep {keep}: a fraction must be in (0, 1]")
    if count < 1:
        raise UserError(f"--keep {keep} keeps {count} experts: at least 1 is needed")
    if count <= n_shared:
        raise UserError(f"--keep {keep} keeps {count} experts, no more than the {n_shared} shared: "
                        "keep at least one routed expert")
    if count > n_original:
        raise UserError(f"--keep {keep}: the model has only {n_original} experts")
    return count


def parse_keep(text):
    """--keep's text: '0.125' (with a decimal point) is a fraction, '8' a count."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise UserError(f"--keep {text!r}: give a fraction (0.125) or a count (8)") from None


@torch.no_grad()
def moe_calls(model, idx):
    """Run model on idx (b, T) in eval mode (token by token routing); per layer, what its MoE took and gave:
    [(input after its norm (b, T, C), output (b, T, C), Routing)]."""
    calls = {}

    def capture(i):
        def hook(module, args, output):
            calls[i] = (args[0], *output)
        return hook

    hooks = [block.moe.register_forward_hook(capture(i)) for i, block in enumerate(model.layers)]
    try:
        with eval_mode(model):
            model.hidden_states(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return [calls[i] for i in range(len(model.layers))]


@torch.no_grad()
def expert_scores(model, batches, method):
    """Score every routed expert of every layer on the calibration batches [(idx (b, T), scored (b, T))], the
    mean over the scored tokens: a list of (Er,) tensors. Routing is token by token (eval mode), so each
    sequence of a batch is computed on its own."""
    device = model.embed.weight.device
    totals = [torch.zeros(block.moe.router.n_routed, device=device) for block in model.layers]
    n_tokens = 0
    for idx, scored in batches:
        calls = moe_calls(model, idx.to(device))
        scored = scored.flatten().to(device)
        n_tokens += int(scored.sum())
        for block, call, total in zip(model.layers, calls, totals):
            total += layer_score(block.moe, *call, scored, method)
    return [t.cpu() / max(n_tokens, 1) for t in totals]


def layer_score(moe, moe_input, moe_output, routing, scored, method):
    """Summed score over one batch's scored tokens for each routed expert of one layer: (Er,). moe_input is
    the MoE's input (after its RMSNorm), moe_output what it adds to the residual stream, scored (N,) bool."""
    router = moe.router
    h = moe_input.flatten(0, 1)[scored]  # (n, C) the scored tokens
    if method in ("greedy", "global", "global_budget"):  # mean router probability
        return router.logits(h).softmax(-1).sum(0)
    kr = router.k_routed
    chosen, weights = routing.experts[scored, :kr], routing.weights[scored, :kr]  # (n, kr)
    if method == "frequency":
        return torch.zeros(router.n_routed, device=h.device).index_add_(0, chosen.flatten(),
                                                                         (weights > 0).flatten().float())
    terms, importance = easy_ep_terms(moe, h, moe_output.flatten(0, 1)[scored], chosen, weights)
    return torch.stack([(weight * norm * importance[token]).sum() for token, weight, norm in terms])


def easy_ep_terms(moe, h, moe_output, chosen, weights):
    """EASY-EP's factors on n tokens (h (n, C): the MoE input after its norm, as in the release; moe_output
    (n, C); chosen, weights (n, kr): the routed experts): per routed expert, over the tokens that chose it,
    (token ids, routing weights, its output's norms), and per token how much the MoE changes its direction,
    1 - cos(h, h + moe_output) (n,)."""
    # 1 - cos(a, b) as |a/|a| - b/|b||^2 / 2: the same value, but no cancellation when the MoE adds little
    direction_change = F.normalize(h.float(), dim=-1) - F.normalize((h + moe_output).float(), dim=-1)
    importance = direction_change.square().sum(-1) / 2  # (n,)
    terms = []
    for e in range(moe.router.n_routed):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        out = swiglu(h[token] @ moe.w_up_gate[e]) @ moe.w_down[e]  # (n_e, C)
        terms.append((token, weights[token, slot].float(), out.float().norm(dim=-1)))
    return terms, importance


def prune_layer(moe, routed_ids):
    """Keep the routed experts routed_ids (sorted, layer-local) and the shared ones; slice the rest away. The
    layer's sizes follow from the sliced shapes (the router reads its own from its gate)."""
    router = moe.router
    keep = torch.cat([routed_ids, torch.arange(router.n_routed, router.n_routed + router.n_shared)])
    keep = keep.to(router.gate.weight.device)
    router.gate.weight = nn.Parameter(router.gate.weight.data[keep].clone())
    router.gate.out_features = len(keep)
    moe.w_up_gate = nn.Parameter(moe.w_up_gate.data[keep].clone())
    moe.w_down = nn.Parameter(moe.w_down.data[keep].clone())


def routed_counts_across_layers(all_scores, n_routed_total):
    """How many routed experts each layer keeps when the best n_routed_total of all layers' experts are
    kept together (global_budget): every layer keeps at least one, then the highest scores win."""
    counts = [1] * len(all_scores)
    rest = torch.cat([s.sort(descending=True).values[1:] for s in all_scores])  # each layer's best is taken
    layer_of = torch.cat([torch.full((len(s) - 1,), i) for i, s in enumerate(all_scores)])
    for i in layer_of[rest.argsort(descending=True, stable=True)[:n_routed_total - len(all_scores)]].tolist():
        counts[i] += 1
    return counts


def mean_score(scores):
    """The mean of the domains' scores [(Er,)] (one domain's as they are)."""
    return scores[0] if len(scores) == 1 else torch.stack(scores).mean(0)


def keep_best(moe, scores, n_routed, compose="union"):
    """Prune one layer from each calibration domain's scores [(Er,)]: one domain keeps its n_routed best routed
    experts (and the shared ones). Several domains (composition) keep the union of each one's n_routed best
    (compose 'union': up to the sum of their budgets) or the n_routed best of their mean score ('mean': the
    budget of one). Returns the layer's record: the kept ids and the (mean) scores."""
    mean = mean_score(scores)
    if compose == "union":
        kept = torch.cat([s.topk(n_routed).indices for s in scores]).unique()  # sorted
    else:
        kept = mean.topk(n_routed).indices.sort().values
    prune_layer(moe, kept)
    return {"kept": kept.tolist(), "scores": [round(s, 6) for s in mean.tolist()]}


@torch.no_grad()
def greedy_layer(block, states, scored, n_routed, compose="union"):
    """One step of layer-wise greedy: score block on its MoE inputs, prune it, and replace each batch's state
    (x, cos, sin, mask, doc ids) by the pruned block's output. states and scored: per domain, per batch.
    Returns the layer's record (keep_best)."""
    device = block.moe.w_up_gate.device
    attended = [[block.attend(x, cos, sin, mask) for x, cos, sin, mask, _ in domain] for domain in states]
    moe_inputs = [[block.moe_norm(h) for h in domain] for domain in attended]
    scores = []
    for domain_inputs, domain_scored in zip(moe_inputs, scored):
        total = torch.zeros(block.moe.router.n_routed, device=device)
        for moe_input, mask in zip(domain_inputs, domain_scored):
            total += block.moe.router.logits(moe_input.flatten(0, 1)[mask]).softmax(-1).sum(0)
        scores.append(total.cpu() / max(sum(int(mask.sum()) for mask in domain_scored), 1))
    record = keep_best(block.moe, scores, n_routed, compose)
    for domain, domain_attended, domain_inputs in zip(states, attended, moe_inputs):
        for b, (h, moe_input) in enumerate(zip(domain_attended, domain_inputs)):  # the layer's output, pruned
            x, *rest = domain[b]
            domain[b] = (h + block.moe(moe_input, rest[-1])[0], *rest)
    return record


@torch.no_grad()
def greedy_layerwise(model, calibrations, n_routed, compose="union"):
    """The release's default: layers in order, layer l scored by its mean router probability over the scored
    calibration tokens with layers < l already pruned. Streamed, so every layer runs once: the batches' hidden
    states go from layer to layer, each layer's MoE input scored, the layer pruned, then run pruned
    (greedy_layer). calibrations: one list of batches per domain. Returns each layer's record (keep_best)."""
    device = model.embed.weight.device
    with eval_mode(model):
        # per domain, per batch: the block inputs (x, cos, sin, mask, doc ids) and the scored tokens (N,)
        states = [[model.layer_inputs(idx.to(device)) for idx, _ in batches] for batches in calibrations]
        scored = [[mask.flatten().to(device) for _, mask in batches] for batches in calibrations]
        return [greedy_layer(block, states, scored, n_routed, compose) for block in model.layers]


def prune_composed(model, calibrations, keep, method, seed=0, compose="union"):
    """Prune model in place for one or several domains, calibrations holding one list of batches per domain:
    keep experts per layer (shared included) for each domain, composed as keep_best says. global_budget keeps
    that many on average, the layers sharing the budget by (mean) score, so counts may differ between layers.
    Returns, per layer, the kept routed experts (layer-local ids before pruning) and every expert's score."""
    n_shared, n_layer = model.cfg.n_shared, model.cfg.n_layer
    if method == "greedy":
        layers = greedy_layerwise(model, calibrations, keep - n_shared, compose)
    else:
        if method == "random":  # a control: a draw per domain and layer
            seeds = [[seed + i + 1000 * d for d in range(len(calibrations))] for i in range(n_layer)]
            scores = [[torch.rand(block.moe.router.n_routed, generator=torch.Generator().manual_seed(s)) for s in layer]
                      for block, layer in zip(model.layers, seeds)]
        else:  # one pass of the full model scores every layer, per domain
            per_domain = [expert_scores(model, batches, method) for batches in calibrations]
            scores = [list(layer) for layer in zip(*per_domain)]
        routed_counts = [keep - n_shared] * n_layer
        if method == "global_budget":
            routed_counts = routed_counts_across_layers([mean_score(layer) for layer in scores],
                                                        n_layer * (keep - n_shared))
        layers = [keep_best(block.moe, layer_scores, n, compose)
                  for block, layer_scores, n in zip(model.layers, scores, routed_counts)]
    set_pruned_config(model)
    return layers


def pruned_config(cfg, sizes):
    """The config of cfg's model pruned to sizes experts per layer (shared included). top_k becomes at most the
    smallest layer's count, as the release's variable-count pruning writes it: its code takes one top_k for
    every layer, so that a layer below it would fail there."""
    uniform = len(set(sizes)) == 1
    return dataclasses.replace(cfg, n_experts=max(sizes), top_k=min(cfg.top_k, min(sizes)),
                               experts_per_layer=() if uniform else tuple(sizes))


def set_pruned_config(model):
    """After its layers were sliced: model's config for the experts each layer now has, and every router's top_k
    (lowered where a layer keeps fewer experts than it: pruned_config)."""
    model.cfg = pruned_config(model.cfg, [block.moe.w_up_gate.shape[0] for block in model.layers])
    for block in model.layers:
        block.moe.router.top_k = model.cfg.top_k


def prune_to(model, kept_per_layer):
    """Prune model in place to the given routed experts of each layer (layer-local ids; the shared ones stay), as
    a pruning record names them. Returns the model."""
    for block, kept in zip(model.layers, kept_per_layer):
        prune_layer(block.moe, torch.as_tensor(kept))
    set_pruned_config(model)
    return model


def prune(model, batches, keep, method, seed=0):
    """Prune model in place for one domain's calibration batches [(idx (b, T), scored (b, T))] (see
    prune_composed)."""
    return prune_composed(model, [batches], keep, method, seed)


# Re-pruning: a pruned model may be pruned again for its domain (keeping fewer experts); its records always
# speak of the original model's experts.

def original_model(ckpt, domain, path):
    """(experts per layer, checkpoint) of the model that ckpt was pruned from, itself if not pruned. A model
    pruned for one domain is not pruned for another: its other experts are gone."""
    previous = ckpt.get("pruning")
    if previous is None:
        return model_config(ckpt, path).n_experts, path
    if previous["domain"] != domain:
        raise UserError(f"{path} is already pruned for {previous['domain']!r}: prune the original model "
                        f"({previous['source']}) for {domain!r} instead")
    return previous["original_n_experts"], previous["source"]


def in_original_ids(layers, ckpt):
    """prune()'s layers with their kept ids in the original model's numbering (unchanged if ckpt was not
    pruned before)."""
    previous = ckpt.get("pruning")
    if previous is None:
        return layers
    return [{**layer, "kept": [before["kept"][i] for i in layer["kept"]]}
            for layer, before in zip(layers, previous["layers"])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--init_from", dest="ckpt", required=True,
                        help="checkpoint: file, run directory, Hugging Face folder or hub id")
    text_arguments(parser, "calibration", "a domain of the built-in corpus (several, comma-separated, compose their "
                   "experts), or the name of --calib's", benchmark=True)
    parser.add_argument("--compose", default="union", choices=("union", "mean"),
                        help="several domains: the union of each one's --keep experts, or --keep by their mean score")
    parser.add_argument("--keep", required=True, help="fraction of the original experts (0.125) or a count (8)")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--calib_docs", type=int, default=16, help="calibration examples used")
    parser.add_argument("--seed", type=int, default=0, help="for --method random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="output path without extension "
                        "(default: out/pruned/MODEL/DOMAIN-keepK-METHOD)")
    parser.add_argument("--hf_out", default="", help="also export the pruned model in Hugging Face format here")
    parser.add_argument("--replace", action="store_true", help="replace --hf_out if it holds anything")
    args = parser.parse_args(argv)
    # every check before any work or writing
    domain, calibration = text_source(args)
    if args.calib_docs < 1:
        raise UserError(f"--calib_docs {args.calib_docs}: at least one calibration example is needed")
    domains = args.domain.split(",") if args.domain else []
    if args.calib and len(domains) > 1:
        raise UserError("--calib is one domain's text: compose several domains of the built-in corpus instead")
    if args.hf_out:
        check_target(args.hf_out, args.replace)
    model, ckpt = load_model(args.ckpt, args.device)
    n_original, source = original_model(ckpt, domain, args.ckpt)
    keep = keep_count(parse_keep(args.keep), n_original, model.cfg.n_shared)
    if keep > min(model.cfg.layer_experts()):
        raise UserError(f"{args.ckpt} keeps {min(model.cfg.layer_experts())} experts in a layer, it cannot keep {keep}")
    calibrations = argument_texts(args, ckpt.get("tokenizer"), model.cfg, domains, args.calib_docs)
    layers = prune_composed(model, calibrations, keep, args.method, args.seed, args.compose)
    layers = in_original_ids(layers, ckpt)
    n_examples = sum(len(idx) for batches in calibrations for idx, _ in batches)  # calibration sequences
    record = {"domain": domain, "keep": keep, "original_n_experts": n_original, "method": args.method,
              **({"compose": args.compose} if len(domains) > 1 else {}), "calibration": calibration,
              "split": text_split(args), "calib_examples": n_examples, "seed": args.seed, "source": source,
              "layers": layers}
    out = args.out or os.path.join("out", "pruned", model_name(args.ckpt), f"{domain}-keep{keep}-{args.method}")
    save_checkpoint(out + ".pt", {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
                                  "step": ckpt.get("step"), "pruning": record, "tokenizer": ckpt.get("tokenizer")})
    atomic_write(out + ".json", lambda f: json.dump(record, f, indent=1), "w")
    if args.hf_out:
        export_hf(model, args.hf_out, tokenizer=from_record(ckpt.get("tokenizer")), pruning=record,
                  replace=args.replace)
    total, active = model.num_params()
    print(f"kept {keep} of {n_original} experts per layer for {domain!r} ({args.method}, {n_examples} "
          f"calibration examples): {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active -> {out}.pt, .json")


if __name__ == "__main__":
    run_command(main)
