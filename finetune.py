"""
Fine-tuning a model (a pruned one, typically) on its domain, as the release does after pruning, and merging a
fine-tuned subset back into its full model (docs/method.md, "Selective expert use"). Fine-tuning: one epoch
over the domain's fine-tuning pool, lr 5e-5 with a linear warmup over the first 10% of the steps then a linear
decay to 0, AdamW without weight decay, token routing (no pools: every router acts as the standard one), the
release's loss terms: cross-entropy on the answer tokens only and the load-balancing loss (weight 0.01), no
z-loss. Merging (--merge_into): the subset's routed experts copied into the full model at their original ids,
as the release's merge_pruned_experts_back.py (and optionally the router rows, the shared experts, the rest,
or an average instead of a copy).

    python finetune.py --ckpt out/pruned/emo_tiny/python-keep8-greedy.pt --domain python
    python finetune.py --ckpt out/pruned/emo_tiny/mine-keep16-greedy.pt --calib my.jsonl --out out/mine-ft
    python finetune.py --ckpt out/pruned/emo_tiny/python-keep8-greedy-ft.pt --merge_into source   # merge it back
    python finetune.py --ckpt out/emo_mmlu_math_16.pt --benchmark mmlu_cat_math --protocol emo --batch_size 32 \
        --n_examples 100000                      # the release's: all of the category's pool, batches of 32

The pool of a built-in domain is n_examples task demonstrations (tasks.py) made from its calibration
documents, with other passages than the ones pruning calibrates on; the scored tokens are their answers. For
your own text (--calib), its examples: a demonstration's answer tokens, or all of a document's. For a
benchmark (--benchmark), its calibration questions under --protocol (pruning's pool: the release fine-tunes on
the examples it selects with), the gold answer's tokens scored. Writes a checkpoint like any other (its
pruning record kept, a "finetune" record added; a merged one a "merge" record).
"""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from calibration import POOL_SEED, argument_texts, text_arguments, text_source
from checkpoint import load_model, save_checkpoint
from data.tokenizer import from_record
from errors import UserError, run_command
from hf import export_hf
from model import token_routing


@dataclass
class FinetuneConfig:
    lr: float = 5e-5
    warmup: float = 0.1  # fraction of the steps
    epochs: int = 1
    batch_size: int = 8
    lb_weight: float = 0.01  # instead of the model's own
    grad_clip: float = 1.0
    seed: int = 0


def answer_targets(idx, scored):
    """Inputs and targets (b, T - 1) of sequences idx (b, T): the next token where it is scored (an answer
    token), -1 (ignored) everywhere else."""
    return idx[:, :-1], idx[:, 1:].masked_fill(~scored[:, 1:], -1)


def finetune_loss(model, inputs, targets, lb_weight):
    """The loss fine-tuning optimises, the release's terms: cross-entropy on the targets (answers only) and the
    load-balancing loss with weight lb_weight (its router_aux_loss_coef); no router or LM-head z-loss. Returns
    (loss, stats)."""
    own = model.cfg
    model.cfg = dataclasses.replace(own, lb_weight=lb_weight, z_weight=0.0, lm_z_weight=0.0)  # what forward adds
    try:
        return model(inputs, targets)
    finally:
        model.cfg = own


def learning_rate(step, n_steps, cfg):
    """Linear warmup over the first cfg.warmup of the steps to cfg.lr, then linear decay to 0."""
    warmup = max(1, math.ceil(cfg.warmup * n_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (n_steps - step) / max(1, n_steps - warmup))


def minibatches(batches, batch_size, generator):
    """The pool's rows in shuffled minibatches of at most batch_size rows of one length: [(idx, scored)]."""
    pieces = [(idx[i:i + batch_size], scored[i:i + batch_size]) for idx, scored in batches
              for i in range(0, len(idx), batch_size)]
    return [pieces[i] for i in torch.randperm(len(pieces), generator=generator).tolist()]


def finetune(model, batches, cfg=FinetuneConfig()):
    """Fine-tune model in place on batches [(idx (b, T), scored (b, T))]; returns the loss of every step. The
    model is left in eval mode."""
    device = model.embed.weight.device
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = [batch for _ in range(cfg.epochs) for batch in minibatches(batches, cfg.batch_size, generator)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    with token_routing(model):  # no pools while fine-tuning, as the release
        for step, (idx, scored) in enumerate(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, len(steps), cfg)
            inputs, targets = answer_targets(idx.to(device), scored.to(device))
            loss, _ = finetune_loss(model, inputs, targets, cfg.lb_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return model.eval(), losses


# ---------------------------------------------------------------------------------------------------------
# Merging a fine-tuned subset back into its full model (the paper's section 6; the release's
# merge_pruned_experts_back.py).

@torch.no_grad()
def merge_back(full, subset, kept_per_layer, router_rows=False, shared=False, non_moe=False, average=None):
    """Copy subset's routed experts into full at their original ids, in place: kept_per_layer holds, per layer,
    the original ids of subset's routed experts in its order (its pruning record). With router_rows also the
    router rows of every kept expert (shared ones included), with shared the shared experts, with non_moe every
    parameter outside the MoE layers (attention, norms, embedding, LM head); with average (alpha in (0, 1))
    (1 - alpha) full + alpha subset instead of a copy. Returns what was copied, counted."""
    def put(target, source):
        if average is None:
            target.copy_(source.to(target.dtype))
        else:
            target.mul_(1 - average).add_(source.to(target.dtype), alpha=average)

    counts = {"routed": 0, "shared": 0, "router_rows": 0, "non_moe": 0}
    n_shared = full.cfg.n_shared
    for block, small, kept in zip(full.layers, subset.layers, kept_per_layer):
        E, small_E = block.moe.w_up_gate.shape[0], small.moe.w_up_gate.shape[0]
        if len(kept) != small_E - n_shared:
            raise UserError(f"the pruning record keeps {len(kept)} routed experts in a layer of {small_E - n_shared}")
        pairs = list(zip(range(len(kept)), kept))  # (the subset's expert, its original id)
        shared_pairs = list(zip(range(small_E - n_shared, small_E), range(E - n_shared, E)))
        for position, original in pairs + (shared_pairs if shared else []):
            put(block.moe.w_up_gate[original], small.moe.w_up_gate[position])
            put(block.moe.w_down[original], small.moe.w_down[position])
        counts["routed"] += len(pairs)
        counts["shared"] += len(shared_pairs) if shared else 0
        if router_rows:
            for position, original in pairs + shared_pairs:
                put(block.moe.router.gate.weight[original], small.moe.router.gate.weight[position])
            counts["router_rows"] += len(pairs) + len(shared_pairs)
    if non_moe:
        subset_params = dict(subset.named_parameters())
        for name, param in full.named_parameters():
            if ".moe." not in name:
                put(param, subset_params[name])
                counts["non_moe"] += 1
    return counts


def merge_command(args):
    """--merge_into: the fine-tuned subset --ckpt merged back into its full model, written as a checkpoint (and
    with --hf_out a Hugging Face folder with the release's merge_metadata.json)."""
    if args.average is not None and not 0 < args.average < 1:
        raise UserError(f"--average {args.average}: the subset's weight must be in (0, 1)")
    subset, subset_ckpt = load_model(args.ckpt, args.device)
    pruning = subset_ckpt.get("pruning")
    if not pruning:
        raise UserError(f"{args.ckpt} records no pruning: merge a pruned (and fine-tuned) model back")
    into = pruning["source"] if args.merge_into == "source" else args.merge_into
    full, full_ckpt = load_model(into, args.device)
    if full_ckpt.get("pruning") or full.cfg.n_layer != subset.cfg.n_layer or full.cfg.d_model != subset.cfg.d_model:
        raise UserError(f"{into} is not the full model {args.ckpt} was pruned from")
    counts = merge_back(full, subset, [layer["kept"] for layer in pruning["layers"]], args.router_rows,
                        args.shared, args.non_moe, args.average)
    record = {"parent_model": into, "pruned_trained_model": args.ckpt, "experts_copied_per_layer":
              [layer["kept"] for layer in pruning["layers"]], "also_copy_router_rows": args.router_rows,
              "also_copy_shared": args.shared, "also_copy_non_moe": args.non_moe,
              **{f"n_{k}_copied": v for k, v in counts.items()},
              "merge_mode": "replace" if args.average is None else "average", "average_weight": args.average}
    out = args.out or os.path.splitext(args.ckpt.rstrip("/"))[0] + "-merged.pt"
    save_checkpoint(out, {"model_config": dataclasses.asdict(full.cfg), "model": full.state_dict(),
                          "step": full_ckpt.get("step"), "merge": record, "tokenizer": full_ckpt.get("tokenizer")})
    if args.hf_out:
        export_hf(full, args.hf_out, tokenizer=from_record(full_ckpt.get("tokenizer")), replace=args.replace,
                  extra={"merge_metadata.json": record})
    print(f"merged {counts['routed']} routed experts back into {into} -> {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint: file, run directory, Hugging Face folder")
    text_arguments(parser, "fine-tuning", "a domain of the built-in corpus (default: the one it was pruned for)",
                   benchmark=True)
    parser.add_argument("--n_examples", type=int, default=64, help="examples in the fine-tuning pool")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="output checkpoint (default: CKPT-ft.pt)")
    for field in dataclasses.fields(FinetuneConfig):
        parser.add_argument(f"--{field.name}", type=field.type, default=field.default)
    merging = parser.add_argument_group("merging a fine-tuned subset back (no training)")
    merging.add_argument("--merge_into", default="", help="the full model --ckpt was pruned from ('source': "
                         "the one its pruning record names)")
    merging.add_argument("--router_rows", action="store_true", help="also the kept experts' router rows")
    merging.add_argument("--shared", action="store_true", help="also the shared experts")
    merging.add_argument("--non_moe", action="store_true", help="also attention, norms, embedding and LM head")
    merging.add_argument("--average", type=float, default=None, help="(1 - A) full + A subset instead of a copy")
    merging.add_argument("--hf_out", default="", help="also export the merged model in Hugging Face format here")
    merging.add_argument("--replace", action="store_true", help="replace --hf_out if it holds anything")
    args = parser.parse_args(argv)
    if args.merge_into:
        return merge_command(args)
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    if args.n_examples < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--n_examples, --epochs and --batch_size must be at least 1")
    model, ckpt = load_model(args.ckpt, args.device)
    if args.benchmark:
        text_source(args)  # a benchmark it knows, and no other text beside it
    domain = args.benchmark or args.domain or (ckpt.get("pruning") or {}).get("domain", "")
    if not args.calib and not domain:
        raise UserError("give --domain (a domain of the built-in corpus), --calib PATH (your own text) or "
                        "--benchmark NAME")
    [batches] = argument_texts(args, ckpt.get("tokenizer"), model.cfg, [domain], args.n_examples, POOL_SEED,
                               answers_only=True)
    model, losses = finetune(model, batches, cfg)
    out = args.out or os.path.splitext(args.ckpt.rstrip("/"))[0] + "-ft.pt"
    data = args.calib or (f"benchmark {args.benchmark} ({args.protocol})" if args.benchmark else
                          f"{args.data_dir} calibration documents")
    record = {**dataclasses.asdict(cfg), "domain": domain, "data": data,
              "examples": sum(len(idx) for idx, _ in batches), "losses": losses}
    save_checkpoint(out, {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
                          "step": ckpt.get("step"), "pruning": ckpt.get("pruning"), "finetune": record,
                          "tokenizer": ckpt.get("tokenizer")})
    print(f"fine-tuned on {record['examples']} examples in {len(losses)} steps (loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}) -> {out}")


if __name__ == "__main__":
    run_command(main)
