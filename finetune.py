"""
Fine-tuning a model (a pruned one, typically) on its domain, as the release does after pruning (docs/method.md,
"Selective expert use"): one epoch over the domain's fine-tuning pool, lr 5e-5 with a linear warmup over the
first 10% of the steps then a linear decay to 0, AdamW without weight decay, the loss on the answer tokens
only, token routing (no pools: every router acts as the standard one), load-balancing weight 0.01.

    python finetune.py --ckpt out/pruned/emo_tiny/python-keep8-greedy.pt --domain python
    python finetune.py --ckpt out/pruned/emo_tiny/mine-keep16-greedy.pt --calib my.jsonl --out out/mine-ft

The pool of a built-in domain is n_examples task demonstrations (tasks.py) made from its calibration
documents, with other passages than the ones pruning calibrates on; the scored tokens are their answers. For
your own text (--calib), its examples: a demonstration's answer tokens, or all of a document's. Writes a
checkpoint like any other (its pruning record kept, a "finetune" record added).
"""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from calibration import POOL_SEED, argument_texts, text_arguments
from checkpoint import load_model, save_checkpoint
from errors import UserError, run_command
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
    """The loss fine-tuning optimises: cross-entropy on the targets (answers only), the router z-loss, and
    the load-balancing loss with weight lb_weight instead of the model's own. Returns (loss, stats)."""
    loss, stats = model(inputs, targets)
    return loss + (lb_weight - model.cfg.lb_weight) * stats["lb_loss"], stats


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint: file, run directory, Hugging Face folder")
    text_arguments(parser, "fine-tuning", "a domain of the built-in corpus (default: the one it was pruned for)")
    parser.add_argument("--n_examples", type=int, default=64, help="examples in the fine-tuning pool")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="output checkpoint (default: CKPT-ft.pt)")
    for field in dataclasses.fields(FinetuneConfig):
        parser.add_argument(f"--{field.name}", type=field.type, default=field.default)
    args = parser.parse_args(argv)
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    if args.n_examples < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--n_examples, --epochs and --batch_size must be at least 1")
    model, ckpt = load_model(args.ckpt, args.device)
    domain = args.domain or (ckpt.get("pruning") or {}).get("domain", "")
    if not args.calib and not domain:
        raise UserError("give --domain (a domain of the built-in corpus) or --calib PATH (your own text)")
    [batches] = argument_texts(args, ckpt.get("tokenizer"), model.cfg, [domain], args.n_examples, POOL_SEED)
    model, losses = finetune(model, batches, cfg)
    out = args.out or os.path.splitext(args.ckpt.rstrip("/"))[0] + "-ft.pt"
    record = {**dataclasses.asdict(cfg), "domain": domain, "data": args.calib or f"{args.data_dir} calibration "
              "documents", "examples": sum(len(idx) for idx, _ in batches), "losses": losses}
    save_checkpoint(out, {"model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
                          "step": ckpt.get("step"), "pruning": ckpt.get("pruning"), "finetune": record,
                          "tokenizer": ckpt.get("tokenizer")})
    print(f"fine-tuned on {record['examples']} examples in {len(losses)} steps (loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}) -> {out}")


if __name__ == "__main__":
    run_command(main)
