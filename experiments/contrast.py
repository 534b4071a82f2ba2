"""
Greedy and EASY-EP side by side: which experts each keeps, and which layers' choices cost loss. At toy size
EMO pruned to 12.5% loses about twice as much over its full model with EASY-EP as with greedy (make paper's
methods table), where the paper finds EMO largely insensitive to the selection method (its Fig. 4). Here each
domain's model is pruned with both methods on the same calibration examples (paper.py's), and per layer:

  shared          how many kept experts the two methods share
  tokens, weight, norm, turn
                  what each method's kept experts are on the scored calibration tokens of the full model
                  (routing token by token), averaged over them: the tokens routed to the expert, and over
                  those tokens its routing weight, the norm of its output and the direction change
                  1 - cos(h, h + MoE(h)) (EASY-EP scores an expert by the sum of weight x norm x turn)
  swap cost       the domain's loss of greedy's model with this layer's experts replaced by EASY-EP's, minus
                  greedy's loss

    python -m experiments.contrast --ckpt out/emo_tiny --fraction 0.125 --out out/contrast
"""

import argparse
import copy
import json
import os
from statistics import mean

import torch

from calibration import few_shot_calibration
from checkpoint import load_model, model_name
from data.corpus import Corpus
from errors import run_command
from eval import evaluate_text
from experiments.paper import PaperConfig, pruned
from experiments.sweep import corpus_domains
from prune import easy_ep_terms, moe_calls, prune_to

METHODS = ("greedy", "easy_ep")
FACTORS = ("tokens", "weight", "norm", "turn")


@torch.no_grad()
def expert_factors(model, batches):
    """Per layer, per routed expert, over the batches' scored tokens in the full model: (Er, 4) of tokens
    routed to it and the mean routing weight, output norm and direction change of those tokens (0 if none)."""
    sums = [torch.zeros(block.moe.router.n_routed, 4) for block in model.layers]
    for idx, scored in batches:
        scored = scored.flatten()
        for block, (moe_input, moe_output, routing), total in zip(model.layers, moe_calls(model, idx), sums):
            kr = block.moe.router.k_routed
            chosen, weights = routing.experts[scored, :kr], routing.weights[scored, :kr]
            terms, turn = easy_ep_terms(block.moe, moe_input.flatten(0, 1)[scored],
                                        moe_output.flatten(0, 1)[scored], chosen, weights)
            for e, (token, weight, norm) in enumerate(terms):
                total[e] += torch.stack([torch.tensor(float(len(token))), weight.sum(), norm.sum(),
                                         turn[token].sum()])
    return [torch.cat([s[:, :1], s[:, 1:] / s[:, :1].clamp(min=1)], dim=1) for s in sums]


def domain_contrast(model, corpus, domain, fraction, cfg):
    """One domain's rows: each method's loss, then per layer the shared experts, each method's kept experts'
    mean factors and the swap cost."""
    examples = few_shot_calibration(corpus, domain.name, cfg.calib_examples)
    kept = {m: [layer["kept"] for layer in pruned(model, [examples], fraction, m)[1]] for m in METHODS}

    def loss(kept_per_layer):
        small = prune_to(copy.deepcopy(model), kept_per_layer)
        return evaluate_text(small, domain.tokens, cfg.batch_size, torch.device(cfg.device), domain.scored)["loss"]

    losses = {m: loss(kept[m]) for m in METHODS}
    rows = []
    for i, factors in enumerate(expert_factors(model, examples)):
        swapped = kept["greedy"][:i] + [kept["easy_ep"][i]] + kept["greedy"][i + 1:]
        rows.append({"domain": domain.name, "layer": i, "shared": len(set(kept["greedy"][i]) & set(kept["easy_ep"][i])),
                     "kept": len(kept["greedy"][i]), "swap_cost": loss(swapped) - losses["greedy"],
                     **{f"{m}_loss": losses[m] for m in METHODS},
                     **{f"{m}_{name}": float(factors[kept[m][i], j].mean()) for m in METHODS
                        for j, name in enumerate(FACTORS)}})
    return rows


def table(rows, fraction):
    """Markdown: per layer, the means over domains."""
    layers = sorted({r["layer"] for r in rows})
    losses = {m: mean(r[f"{m}_loss"] for r in rows if r["layer"] == 0) for m in METHODS}
    lines = [f"Greedy and EASY-EP at {fraction:.2%} of the experts, means over {len(rows) // len(layers)} domains: "
             f"loss greedy {losses['greedy']:.4f}, EASY-EP {losses['easy_ep']:.4f}.", "",
             "| layer | shared | tokens (greedy / EASY-EP) | weight | norm | turn | swap cost |",
             "|---|---|---|---|---|---|---|"]
    for i in layers:
        at = [r for r in rows if r["layer"] == i]
        cells = [" / ".join(f"{mean(r[f'{m}_{name}'] for r in at):.3g}" for m in METHODS) for name in FACTORS]
        lines.append(f"| {i} | {mean(r['shared'] for r in at):.1f} of {at[0]['kept']} | " + " | ".join(cells)
                     + f" | {mean(r['swap_cost'] for r in at):+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--fraction", type=float, default=PaperConfig.smallest)
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = PaperConfig()
    corpus = Corpus(args.data_dir)
    model, _ = load_model(args.ckpt)
    corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
    rows = [r for domain in corpus_domains(corpus, cfg.calib_examples, cfg.eval_tokens)
            for r in domain_contrast(model, corpus, domain, args.fraction, cfg)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = f"{model_name(args.ckpt)}: " + table(rows, args.fraction)
    with open(os.path.join(args.out, "contrast.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    run_command(main)
