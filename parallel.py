"""
Scale for train.py: the process group torchrun asks for, the devices' peak FLOP/s (for MFU), the model wrapped
in DDP or sharded with FSDP2, activation checkpointing, and the few collectives the loop needs beside those in
the model (router.py all-reduces its expert counts itself).

    rank, world, device = setup_distributed(cfg)          # (0, 1, device) without torchrun
    model, raw = build_model(model_cfg, cfg, device, world, torch.bfloat16)
"""

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from model import EMO


def setup_distributed(cfg):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        if use_cuda:
            return 0, 1, torch.device("cuda")
        return 0, 1, torch.device("cpu" if cfg.device == "auto" else cfg.device)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


# bf16 dense peak FLOP/s per device, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device, given=0.0):
    """The device's peak FLOP/s for MFU: given, else looked up from the GPU's name (0: unknown, e.g. a CPU)."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in name), 0.0)


def checkpoint_blocks(model):
    """Activation checkpointing: each block keeps only its input for the backward and recomputes the rest
    there (the recompute redraws the same pools: checkpoint restores the RNG state)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_model(model_cfg, cfg, device, world, compute_dtype=torch.float32):
    """The model on its device, wrapped for data parallelism. Returns (model to call, the bare module).
    FSDP2 shards every block and the rest; with bfloat16 compute it keeps float32 master weights, gathers
    bfloat16 copies for the forward and backward, and reduces gradients in float32. With
    cfg.activation_checkpointing the blocks are checkpointed before they are sharded."""
    prepare = checkpoint_blocks if cfg.activation_checkpointing else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.parallel == "fsdp" and world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        with torch.device("meta"):
            raw = EMO(model_cfg)
        if prepare is not None:
            prepare(raw)
        for block in raw.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(raw, mp_policy=policy)
        raw.to_empty(device=device)
        raw.init_weights()
    else:
        with torch.device(device):
            raw = EMO(model_cfg)
        if prepare is not None:
            prepare(raw)
    model = torch.compile(raw) if cfg.compile else raw
    if cfg.parallel == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, raw


def any_rank(flag, world, device):
    """Whether flag is set on any rank."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def leave_process_group():
    """A workaround: leave together, then end the process without C++ static destructors. After a finished
    run, a gloo rank has aborted in them ('terminate called without an active exception'), failing a run that
    had written everything."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
