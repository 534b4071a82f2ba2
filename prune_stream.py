"""
Layer-wise greedy pruning streamed from a checkpoint's files, for a model larger than the machine's memory
(the release's 14B parameters on a 24 GB machine). The calibration tokens' hidden states are kept; layer by
layer, the layer's tensors are read from the memory-mapped files, the layer is scored, sliced, run pruned on
the hidden states and written to the pruned model's own shard, then freed. What is held at once: one layer,
the hidden states and the embedding (the LM head and the final norm are copied across, never used). The
experts kept are those of prune.py's greedy method on the whole model in memory (tests/test_prune_stream.py).

    python prune_stream.py --ckpt path/to/Emo_1b14b_1T --data_dir data/multidomain_dolma2 --domain c --keep 0.125 \\
        --out out/emo_c_hf
    python prune_stream.py --ckpt out/emo_tiny --calib my_notes/ --domain notes --keep 16 --out out/notes_hf

--ckpt is a Hugging Face folder (the release's format) or a nanoEMO checkpoint; the output is a
Hugging Face folder (one shard per layer, with config.json, pruning.json and tokenizer.json), written beside
OUT and renamed to OUT when complete (files.atomic_folder), so that a run that fails half-way (a full disk)
leaves no half-written model; an OUT that holds anything is refused unless --replace. On a CPU the layers
compute in float32, whatever the checkpoint's dtype; the shards keep it.
"""

import argparse
import os

import torch
from safetensors.torch import save_file

from calibration import argument_texts, text_arguments, text_source, text_split
from checkpoint import is_hf_checkpoint, load_checkpoint, model_config
from data.tokenizer import from_record, tokenizer_record
from errors import UserError, run_command
from files import atomic_folder, check_target
from hf import (OUTSIDE_LAYERS, TensorFiles, block_tensors, checkpoint_dtype, config_from_hf, load_block, read_json,
                read_pruning, write_metadata)
from model import EMO, Block
from prune import greedy_layer, keep_count, parse_keep, pruned_config


class HFLayers:
    """A release-format folder read a layer at a time (hf.TensorFiles maps a file only for each read, so that
    the pages read do not stay in the process's resident set)."""

    def __init__(self, folder):
        hf = read_json(os.path.join(folder, "config.json"))
        previous = read_pruning(folder)
        if previous:
            raise UserError(f"{folder} is already pruned: stream the original model ({previous['source']})")
        self.cfg = config_from_hf(hf, os.path.basename(os.path.normpath(folder)))
        self.dtype = checkpoint_dtype(hf)
        self.tensors = TensorFiles(folder)  # a missing or damaged file is named now, before any work
        tokenizer = os.path.join(folder, "tokenizer.json")
        self.tokenizer = tokenizer_record(tokenizer) if os.path.exists(tokenizer) else None

    def outside(self, name):
        """A tensor outside the layers by its nanoEMO name (embed.weight, norm.weight, lm_head.weight)."""
        hf_name = next(hf for hf, ours in OUTSIDE_LAYERS if ours == name)
        shape = (self.cfg.d_model,) if name == "norm.weight" else (self.cfg.vocab_size, self.cfg.d_model)
        return self.tensors.get(hf_name, shape)

    def fill(self, block, i):
        load_block(self.tensors, block, i)


class CheckpointLayers:
    """A nanoEMO checkpoint read a layer at a time (torch.load memory-maps it)."""

    def __init__(self, path):
        ckpt = load_checkpoint(path)
        if ckpt.get("pruning"):
            raise UserError(f"{path} is already pruned: stream the original model ({ckpt['pruning']['source']})")
        self.cfg, self.state, self.tokenizer = model_config(ckpt, path), ckpt["model"], ckpt.get("tokenizer")
        self.dtype = self.state["embed.weight"].dtype

    def outside(self, name):
        return self.state[name]

    def fill(self, block, i):
        prefix = f"layers.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)})


@torch.no_grad()
def stream_prune(source, batches, keep, folder, device="cpu"):
    """Prune source's model (HFLayers or CheckpointLayers) to keep experts per layer, layer-wise greedy, writing
    each pruned layer's shard into folder as it is made. Returns (the pruned config, per-layer records, the
    shards' index {tensor name: file})."""
    cfg = source.cfg
    compute = torch.float32 if torch.device(device).type == "cpu" else source.dtype
    with torch.device("meta"):
        skeleton = EMO(cfg).eval()  # only its embedding is filled: layer_inputs, as in eval mode
    skeleton.embed = torch.nn.Embedding.from_pretrained(source.outside("embed.weight").to(device, compute))
    states = [[skeleton.layer_inputs(idx.to(device)) for idx, _ in batches]]
    scored = [[mask.flatten().to(device) for _, mask in batches]]
    n_files, layers, weight_map = cfg.n_layer + 1, [], {}
    for i, n_experts in enumerate(cfg.layer_experts()):
        with torch.device("meta"):
            block = Block(cfg, n_experts)
        block.to_empty(device=device).to(compute)
        source.fill(block, i)
        layers.append(greedy_layer(block.eval(), states, scored, keep - cfg.n_shared))
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        shard = block_tensors(block, i, source.dtype)
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del block, shard
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    outside = {hf: source.outside(ours).to(source.dtype).contiguous() for hf, ours in OUTSIDE_LAYERS}
    save_file(outside, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in outside})
    return pruned_config(cfg, [keep] * cfg.n_layer), layers, weight_map


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Hugging Face folder or a nanoEMO checkpoint")
    text_arguments(parser, "calibration", benchmark=True)
    parser.add_argument("--keep", required=True, help="fraction of the experts (0.125) or a count (8)")
    parser.add_argument("--calib_docs", type=int, default=16, help="calibration examples used")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="the pruned model's folder (Hugging Face format)")
    parser.add_argument("--replace", action="store_true", help="replace --out if it holds anything")
    args = parser.parse_args(argv)
    domain, calibration = text_source(args)
    if args.calib_docs < 1:
        raise UserError(f"--calib_docs {args.calib_docs}: at least one calibration example is needed")
    check_target(args.out, args.replace)
    source = HFLayers(args.ckpt) if is_hf_checkpoint(args.ckpt) else CheckpointLayers(args.ckpt)
    if source.cfg.experts_per_layer:
        raise UserError(f"{args.ckpt} keeps different numbers of experts per layer: stream the original model")
    keep = keep_count(parse_keep(args.keep), source.cfg.n_experts, source.cfg.n_shared)
    [batches] = argument_texts(args, source.tokenizer, source.cfg, [args.domain], args.calib_docs)
    with atomic_folder(args.out, args.replace) as tmp:
        pruned, layers, weight_map = stream_prune(source, batches, keep, tmp, args.device)
        record = {"domain": domain, "keep": keep, "original_n_experts": source.cfg.n_experts, "method": "greedy",
                  "calibration": calibration, "split": text_split(args),
                  "calib_examples": sum(len(idx) for idx, _ in batches), "source": args.ckpt, "layers": layers}
        write_metadata(tmp, pruned, source.dtype, weight_map, from_record(source.tokenizer), record)
    print(f"kept {keep} of {source.cfg.n_experts} experts per layer for {domain!r} (greedy, streamed) -> {args.out}")


if __name__ == "__main__":
    run_command(main)
