"""
Checkpoints of nanoEMO: one torch file holding everything needed to rebuild a model, and for a training
run to continue exactly where it stopped; and loading a model from any checkpoint, ours or the release's.

    {"model_config": {...}, "model": state_dict, "step": int, "tokenizer": {...}, ...}
        # train.py (its save()) adds optimizer, RNG, data position; prune.py adds "pruning"
Written atomically (files.py): a write killed half-way leaves the previous checkpoint intact.

    save_checkpoint("out/emo_tiny/ckpt.pt", payload)
    model, ckpt = load_model("out/emo_tiny")          # run directory, file, or Hugging Face folder / hub id
    python checkpoint.py --ckpt out/emo_tiny --hf_out out/emo_tiny_hf      # export in the release's format
"""

import argparse
import dataclasses
import json
import os
import pickle

import torch
import torch.distributed as dist

from data.tokenizer import from_record, load_tokenizer, tokenizer_record
from errors import UserError, run_command
from files import atomic_write, check_target
from hf import DTYPES, export_hf, load_hf, read_pruning, resolve_folder
from model import EMO, ModelConfig

CHECKPOINT_NAME = "ckpt.pt"


def save_checkpoint(path, payload):
    atomic_write(path, lambda f: torch.save(payload, f))


def checkpoint_path(path):
    """A checkpoint file, or the ckpt.pt inside a run directory."""
    file = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise UserError(f"checkpoint not found: {file}")
    return file


def model_config(ckpt, path):
    """The ModelConfig a checkpoint records; a key this version does not know is a one-line error."""
    try:
        return ModelConfig(**ckpt["model_config"])
    except TypeError as error:  # an unexpected keyword: written by another version of nanoEMO
        raise UserError(f"{path}: its model config does not fit this nanoEMO ({error}); was it written by another "
                        "version?") from None


def load_checkpoint(path, map_location="cpu"):
    file = checkpoint_path(path)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=False, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:  # what torch raises for them
        raise UserError(f"{file} is truncated or not a torch checkpoint: torch could not read it "
                        f"({str(error).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{file} is not a nanoEMO checkpoint (no model_config / model)")
    return ckpt


def check_shapes(model, state_dict, source):
    """Refuse a state dict whose tensors do not fit the model, naming them."""
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in the model"
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = own.keys() - state_dict.keys(), state_dict.keys() - own.keys()
    if wrong or missing or unexpected:
        raise UserError(f"checkpoint of another shape: {'; '.join(wrong[:4])}"
                        f"{' missing ' + ', '.join(sorted(missing)[:4]) if missing else ''}"
                        f"{' unexpected ' + ', '.join(sorted(unexpected)[:4]) if unexpected else ''}")


def checkpoint_paths(spec):
    """--ckpt's comma-separated checkpoints, each checked to exist (a Hugging Face hub id is fetched later)."""
    paths = spec.split(",")
    for path in paths:
        if not is_hf_checkpoint(path):
            checkpoint_path(path)
    return paths


def model_name(path):
    """A short label for a checkpoint: out/emo_tiny -> emo_tiny, out/x/ckpt.pt -> x, allenai/Emo -> Emo."""
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path) if path.endswith(CHECKPOINT_NAME) else path).removesuffix(".pt")


def is_hf_checkpoint(path):
    """A release-format folder (config.json + safetensors), or a hub id like allenai/Emo_1b14b_1T."""
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "config.json"))
    return not os.path.exists(path) and path.count("/") == 1 and not path.endswith(".pt")


def load_model(path, device="cpu"):
    """The model of a checkpoint (nanoEMO file or run directory, or Hugging Face folder or hub id), in eval
    mode, with the checkpoint dict ({"model_config", "step", "tokenizer"?} for a Hugging Face one, the
    tokenizer read from its tokenizer.json)."""
    if is_hf_checkpoint(path):
        folder = resolve_folder(path)
        model = load_hf(folder, device, name=path)
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        tokenizer = tokenizer_record(tokenizer_file) if os.path.exists(tokenizer_file) else None
        return model, {"model_config": dataclasses.asdict(model.cfg), "step": None, "tokenizer": tokenizer,
                       "pruning": read_pruning(folder)}
    ckpt = load_checkpoint(path)
    cfg = model_config(ckpt, path)
    with torch.device("meta"):
        model = EMO(cfg)
    model.to_empty(device=device)
    check_shapes(model, ckpt["model"], checkpoint_path(path))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def checkpoint_tokenizer(record, given, path):
    """The tiktoken encoding to use with the checkpoint at path: the one given (gpt2, cl100k_base, dolma2, a rank
    file or a tokenizer.json), else the one it records (record: its "tokenizer" entry, None if it has none)."""
    encoding = load_tokenizer(given) if given else from_record(record)
    if encoding is None:
        raise UserError(f"{path} records no tokenizer: give --tokenizer (gpt2, cl100k_base, dolma2, a rank file or "
                        "a tokenizer.json)")
    return encoding


# A training run's state (train.py): the model and optimizer unsharded whatever the parallelism, and every
# rank's RNG, so that a resumed run continues exactly.

def full_state(raw, optimizer):
    """Unsharded model and optimizer state on the CPU, whatever the parallelism; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(raw, optimizer, options=options)


def load_full_state(raw, optimizer, model_state, optim_state=None):
    """Load unsharded state (model, and optimizer when given) into any parallelism; FSDP keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
    options = StateDictOptions(full_state_dict=True)
    if optim_state is None:
        set_model_state_dict(raw, model_state, options=options)
    else:
        set_state_dict(raw, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def rng_state(device):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_ranks_rng_states(device, world):
    """Every rank's RNG state, gathered (a collective when world > 1): [state of rank 0, ...]."""
    if world == 1:
        return [rng_state(device)]
    states = [None] * world
    dist.all_gather_object(states, rng_state(device))
    return states


def save_run(run):
    """A training run's (train.Run) ckpt.pt, atomic, with everything a resume needs, and its history.json; the
    state is gathered on every rank, written by rank 0. A model with a non-finite weight is never written."""
    model_state, optim_state = full_state(run.raw, run.optimizer)
    rngs = all_ranks_rng_states(run.device, run.world)
    bad = [name for name, value in model_state.items() if not torch.isfinite(value).all()]
    if bad:
        raise UserError(f"step {run.step}: {len(bad)} weights are not finite ({bad[0]}...): not saved, the last "
                        "checkpoint kept; resume it with a lower lr")
    if run.rank == 0:
        save_checkpoint(os.path.join(run.cfg.out_dir, CHECKPOINT_NAME), {
            "model_config": dataclasses.asdict(run.model_cfg), "model": model_state, "optimizer": optim_state,
            "train_config": dataclasses.asdict(run.cfg), "step": run.step, "world": run.world,
            "data": run.windows.state_dict(), "rng": rngs, "history": run.history, "tokenizer": run.tokenizer})
        atomic_write(os.path.join(run.cfg.out_dir, "history.json"), lambda f: json.dump(run.history, f), "w")


def resume_run(run, ckpt):
    """Continue a training run from its checkpoint exactly: weights, optimizer, step, history, data position and
    this rank's RNG state."""
    if ckpt.get("world", 1) != run.world:
        raise UserError(f"checkpoint written by {ckpt.get('world')} ranks, resuming with {run.world}: "
                        "RNG streams would differ; resume with the same number of ranks")
    load_full_state(run.raw, run.optimizer, ckpt["model"], ckpt["optimizer"])
    run.step, run.history = ckpt["step"], ckpt["history"]
    run.windows.load_state_dict(ckpt["data"])
    set_rng_state(ckpt["rng"][run.rank], run.device)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanoEMO checkpoint in the release's Hugging Face format")
    parser.add_argument("--ckpt", required=True, help="nanoEMO checkpoint (file or run directory)")
    parser.add_argument("--hf_out", required=True, help="folder to write config.json and safetensors into")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--replace", action="store_true", help="replace --hf_out if it holds anything")
    args = parser.parse_args(argv)
    check_target(args.hf_out, args.replace)
    model, ckpt = load_model(args.ckpt)
    export_hf(model, args.hf_out, DTYPES[args.dtype], tokenizer=from_record(ckpt.get("tokenizer")),
              pruning=ckpt.get("pruning"), replace=args.replace)
    print(f"wrote {args.hf_out}: {model.cfg.n_experts} experts x {model.cfg.n_layer} layers, {args.dtype}")


if __name__ == "__main__":
    run_command(main)
