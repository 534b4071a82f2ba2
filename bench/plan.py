"""
Scale on paper: the memory one GPU needs to train a config under FSDP2, the FLOPs per token, and the time for
the whole token budget, without a GPU. Not a test.

    python bench/plan.py config/emo_full.py --world_size=8
    python bench/plan.py config/emo_full.py --world_size=64 --batch_size=2 --activation_checkpointing=True

Per GPU, with P parameters sharded over world_size GPUs (FSDP2, bf16 compute as train.py configures it):
- float32 master weights 4P/W, float32 gradients 4P/W, AdamW's two float32 moments 8P/W;
- bf16 copies gathered for compute: the unsharded root (embedding, LM head, final norm) and two blocks (the
  one computing and the next, prefetched), and one block's float32 gradients before their reduce-scatter;
- activations saved for the backward, measured by running train.py's model on fake tensors (no memory is
  allocated) at the micro-batch's shape and summing every tensor autograd saves, once per storage; with
  activation checkpointing only each block's input is kept, plus one block's activations while it is
  recomputed; the chunked LM loss keeps the gradients of the hidden states and of the head;
- the largest transient of the LM loss: one chunk of float32 logits and its gradient.
Attention masks and rotary tables are shared by all layers and counted once. Not counted: the CUDA context
and NCCL buffers (~1-2 GB), allocator fragmentation, the micro-batch itself; the verdict keeps 10% free.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from lm_loss import chunk_rows  # noqa: E402
from model import EMO, ModelConfig  # noqa: E402
from parallel import PEAK_FLOPS, checkpoint_blocks  # noqa: E402
from train import TrainConfig  # noqa: E402

GIB = 2 ** 30


@dataclass
class PlanConfig:
    world_size: int = 8
    gpu_memory_gib: float = 80.0  # H100 80GB
    mfu: float = 0.0  # 0: print the release's reported ~18% and 40%
    total_tokens: float = 1e12  # the release's budget
    forward_tokens: float = 0.0  # and tokens run forward only (evaluation, pruning): a third of a training token


def fake_model(cfg):
    """The model as FSDP2 computes with it: bf16 parameters (its gathered copies) that allocate nothing (fake
    CPU tensors), in training mode."""
    with torch.device("meta"):
        model = EMO(cfg)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=torch.bfloat16, device="cpu")))
    return model.train()


def saved_activation_bytes(cfg, batch_size, checkpointing):
    """Bytes autograd saves for the backward in one training forward of batch_size sequences, bf16 autocast.
    Parameters autograd keeps are not counted: FSDP2 frees its gathered copies after the forward and gathers
    them again for the backward (they are in the 'gathered' line)."""
    with FakeTensorMode():
        model = fake_model(cfg)
        if checkpointing:
            checkpoint_blocks(model)
        idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len))
        idx[:, ::600] = cfg.eos_id  # documents of 600 tokens
        parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        saved = {}  # storage -> bytes: views of one storage count once

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in parameters:
                saved[storage._cdata] = storage.nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
        return sum(saved.values())


def activations(cfg, batch_size, checkpointing):
    """(saved for the whole model, one block's activations): measured at 1 and 2 layers, which gives the
    cost of a block and of the rest, then extrapolated to n_layer (blocks are identical)."""
    def saved(n_layer, checkpointing):
        return saved_activation_bytes(dataclasses.replace(cfg, n_layer=n_layer, experts_per_layer=()), batch_size,
                                      checkpointing)

    one, two = saved(1, checkpointing), saved(2, checkpointing)
    per_block = two - one
    block_full = saved(2, False) - saved(1, False) if checkpointing else per_block
    return one + (cfg.n_layer - 1) * per_block, block_full


def memory_plan(cfg, batch_size, world, checkpointing):
    """{item: bytes} per GPU."""
    with torch.device("meta"):
        model = EMO(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = total - sum(p.numel() for p in model.layers.parameters())
    saved, block_full = activations(cfg, batch_size, checkpointing)
    plan = {
        "float32 master weights (sharded)": 4 * total / world,
        "float32 gradients (sharded)": 4 * total / world,
        "AdamW moments (sharded)": 8 * total / world,
        "bf16 gathered: root + 2 blocks": 2 * (root + 2 * block),
        "float32 gradients of one block before reduce-scatter": 4 * block,
        "activations saved for the backward": saved,
        "LM loss chunk: logits and their gradient": 2 * 4 * chunk_rows(cfg.vocab_size, "cuda") * cfg.vocab_size,
    }
    if checkpointing:
        plan["one block recomputed in the backward"] = block_full
    return plan, total


def largest_micro_batch(cfg, world, checkpointing, budget):
    """The most sequences per GPU that fit the budget (powers of two up to 32), or 0."""
    best = 0
    for batch_size in (1, 2, 4, 8, 16, 32):
        plan, _ = memory_plan(cfg, batch_size, world, checkpointing)
        if sum(plan.values()) > budget:
            break
        best = batch_size
    return best


def main():
    (train_cfg, model_cfg, plan_cfg), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, PlanConfig)
    world, B, T = plan_cfg.world_size, train_cfg.batch_size, model_cfg.seq_len
    budget = 0.9 * plan_cfg.gpu_memory_gib * GIB
    with torch.device("meta"):
        model = EMO(model_cfg)
    total, active = model.num_params()
    flops = model.flops_per_token(T)
    print(f"{total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active | {flops / 1e9:.2f} GFLOP per token "
          f"(training, seq {T}) | {world} GPUs x {B} sequences x {train_cfg.grad_accum} micro-steps")
    for checkpointing in (False, True):
        plan, _ = memory_plan(model_cfg, B, world, checkpointing)
        need = sum(plan.values())
        print(f"\nper GPU, activation checkpointing {'on' if checkpointing else 'off'}, micro-batch {B} x {T}:")
        for item, size in plan.items():
            print(f"  {item:<56}{size / GIB:8.2f} GiB")
        fits = "fits" if need <= budget else "does NOT fit"
        print(f"  {'total':<56}{need / GIB:8.2f} GiB: {fits} in {plan_cfg.gpu_memory_gib:.0f} GB with 10% kept free;"
              f" largest micro-batch that fits: {largest_micro_batch(model_cfg, world, checkpointing, budget)}")
    peak = PEAK_FLOPS["H100"]
    work = (plan_cfg.total_tokens + plan_cfg.forward_tokens / 3) * flops
    seconds = {mfu: work / (world * peak * mfu) for mfu in ([plan_cfg.mfu] if plan_cfg.mfu else [0.18, 0.40])}
    forward = f" and {plan_cfg.forward_tokens / 1e9:g}B forward-only" if plan_cfg.forward_tokens else ""
    for mfu, s in seconds.items():
        print(f"\n{plan_cfg.total_tokens / 1e9:g}B training tokens{forward} on {world} H100s at {mfu:.0%} MFU "
              f"({peak / 1e12:.0f} TFLOP/s bf16 peak): {s / 86400:.2f} days ({s / 3600:.1f} hours)")


if __name__ == "__main__":
    main()
