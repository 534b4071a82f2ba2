"""Run by tests/test_train.py under torchrun (gloo, CPU): trains with train.py, then gathers every rank's
full parameters so the test can check that the ranks agree and match a single-process run.

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT.pt [train.py arguments]
"""

import sys

import torch
import torch.distributed as dist

from parallel import leave_process_group
from train import train


def full_parameters(model):
    """All parameters flattened into one vector; FSDP's sharded DTensors are gathered first."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in model.parameters()])


def main():
    out_path, argv = sys.argv[1], sys.argv[2:]
    model, history = train(argv)
    params = full_parameters(model)
    gathered = [torch.zeros_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    if dist.get_rank() == 0:
        torch.save({"params": params, "ranks_max_diff": max((g - params).abs().max().item() for g in gathered),
                    "losses": [r["loss"] for r in history], "lb": [r["lb_loss"] for r in history]}, out_path)
    leave_process_group()


if __name__ == "__main__":
    main()
