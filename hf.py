"""
Hugging Face interop: load the released EMO checkpoints (allenai/Emo_1b14b_1T, allenai/StdMoE_1b14b_1T)
into nanoEMO, and export any nanoEMO model, pruned ones included, in the same format.

The format (docs/method.md, "Inference and the checkpoint format"): config.json and safetensors
(one file, or shards listed by model.safetensors.index.json) with, for layer i and expert j,
    model.embed_tokens.weight (V, C)            lm_head.weight (V, C)            model.norm.weight (C)
    model.layers.i.pre_attention_layernorm.weight (C)      model.layers.i.pre_feedforward_layernorm.weight (C)
    model.layers.i.self_attn.{q,k,v,o}_proj.weight (C, C)  model.layers.i.mlp.gate.weight (E, C), shared last
    model.layers.i.mlp.experts.j.{gate,up}_proj.weight (H, C)    model.layers.i.mlp.experts.j.down_proj.weight (C, H)
nanoEMO stacks the experts: w_up_gate[j] = [gate_proj.T | up_proj.T] (C, 2H), w_down[j] = down_proj.T (H, C).
Inference routing is the release's: softmax over the routed experts, top (k - n_shared), no renormalisation,
shared expert with weight 1 (the model's token routing).

    model = load_hf("path/to/Emo_1b14b_1T")            # or a hub id, with huggingface_hub and a network
    export_hf(model, "out/emo_tiny_hf")                 # the command line: python checkpoint.py --hf_out
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.tokenizer_json import write_tokenizer_json
from errors import UserError
from files import atomic_folder
from model import EMO, ModelConfig

MODEL_TYPE = "emo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


OUTSIDE_LAYERS = [("model.embed_tokens.weight", "embed.weight"), ("lm_head.weight", "lm_head.weight"),
                  ("model.norm.weight", "norm.weight")]  # (Hugging Face name, nanoEMO parameter name)


def layer_names(i):
    """(Hugging Face name, the Block's parameter name) of layer i's tensors but the experts'."""
    hf = f"model.layers.{i}."
    return [(hf + "pre_attention_layernorm.weight", "attn_norm.weight"),
            (hf + "pre_feedforward_layernorm.weight", "moe_norm.weight"),
            (hf + "mlp.gate.weight", "moe.router.gate.weight")] + \
        [(hf + f"self_attn.{p}_proj.weight", f"attn.{p}_proj.weight") for p in "qkvo"]


def expert_names(i, j):
    prefix = f"model.layers.{i}.mlp.experts.{j}."
    return prefix + "gate_proj.weight", prefix + "up_proj.weight", prefix + "down_proj.weight"


TRAINING_KEYS = ("router", "pool_min", "pool_max", "pool_eval", "doc_attention", "lb_weight", "z_weight",
                 "lm_z_weight", "init_std")  # ModelConfig fields config.json has no key for


def release_training_settings(folder_name, n_experts, top_k):
    """The release's training settings (docs/method.md), which its config.json does not hold: EMO draws pools
    from [top_k, n_experts] (the release's [8, 128]; top_k <= n_experts), masks attention within documents
    and uses an LM-head z-loss of 1e-5; its baseline (StdMoE in the name) routes every token on its own and
    does not mask."""
    standard = "stdmoe" in folder_name.lower()
    return {"router": "std" if standard else "emo", "pool_min": top_k, "pool_max": n_experts,
            "doc_attention": not standard, "lm_z_weight": 1e-5}


def checkpoint_dtype(hf):
    """The dtype a config.json records: transformers writes "dtype" since 4.56, "torch_dtype" before."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise UserError(f"config.json: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def config_from_hf(hf, folder_name="", eval_doc_attention=False):
    """ModelConfig from a release config.json dict; an error names any key this model cannot honour.
    Training settings come from the `nanoemo` key of our exports, else the release's own. At inference the
    release attends causally only, whatever it trained with: eval_doc_attention=True masks documents then too."""
    if hf.get("model_type") != MODEL_TYPE:
        raise UserError(f"config.json: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                "num_experts_per_tok", "vocab_size", "eos_token_id"):
        if key not in hf:
            raise UserError(f"config.json: missing key {key!r}")
    heads, n_layer = hf["num_attention_heads"], hf["num_hidden_layers"]
    n_shared = hf.get("num_shared_experts", 1)
    per_layer = hf.get("num_experts_per_layer") or [hf["num_experts"]] * n_layer
    shared_per_layer = hf.get("num_shared_experts_per_layer") or [n_shared] * n_layer
    problems = [text for bad, text in (
        (hf.get("norm_topk_prob"), "norm_topk_prob=true (the release does not renormalise)"),
        (hf.get("tie_word_embeddings"), "tie_word_embeddings=true (embedding and LM head are untied)"),
        (hf.get("num_key_value_heads", heads) != heads, "num_key_value_heads != num_attention_heads (no GQA)"),
        (len(per_layer) != n_layer, f"num_experts_per_layer has {len(per_layer)} entries for {n_layer} layers"),
        (hf["num_experts"] not in (min(per_layer), max(per_layer)),
         f"num_experts {hf['num_experts']} contradicts num_experts_per_layer {per_layer} (the release writes the "
         "smallest count, nanoEMO the largest)"),
        (set(shared_per_layer) != {n_shared}, f"num_shared_experts_per_layer {shared_per_layer} differ from "
                                              f"num_shared_experts {n_shared}"))
        if bad]
    if problems:
        raise UserError(f"config.json: unsupported {'; '.join(problems)}")
    n_experts = max(per_layer)
    top_k = min(hf["num_experts_per_tok"], n_experts)
    settings = hf.get("nanoemo") or release_training_settings(folder_name, n_experts, top_k)
    return ModelConfig(vocab_size=hf["vocab_size"], eos_id=hf["eos_token_id"],
                       seq_len=hf.get("max_position_embeddings", 4096), n_layer=n_layer, n_head=heads,
                       d_model=hf["hidden_size"], n_experts=n_experts, n_shared=n_shared, top_k=top_k,
                       experts_per_layer=() if len(set(per_layer)) == 1 else tuple(per_layer),
                       expert_hidden=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta", 10000.0)),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), eval_doc_attention=eval_doc_attention, **settings)


def pad_id(tokenizer):
    """The id of a tiktoken encoding's <|pad|> token (the release's dolma2 has one: 100277), else None."""
    if tokenizer is None or "<|pad|>" not in tokenizer.special_tokens_set:
        return None
    return tokenizer.encode_single_token("<|pad|>")


def hf_config(cfg, dtype, pad_token_id=None):
    """A release-style config.json dict for a nanoEMO model: per-layer counts (pruned models may keep
    different ones), the release's auto_map (its configuration_emo.py / modeling_emo.py, which a folder needs
    beside config.json for transformers' trust_remote_code), and under `nanoemo` the training settings
    config.json has no key for."""
    return {"model_type": MODEL_TYPE, "architectures": ["EmoForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_emo.EmoConfig",
                         "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"}, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.expert_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k, "num_shared_experts": cfg.n_shared, "norm_topk_prob": False,
            "num_experts_per_layer": cfg.layer_experts(),
            "num_shared_experts_per_layer": [cfg.n_shared] * cfg.n_layer, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_id,
            "pad_token_id": pad_token_id, "max_position_embeddings": cfg.seq_len, "tie_word_embeddings": False,
            "attention_bias": False, "hidden_act": "silu", "dtype": str(dtype).removeprefix("torch."),
            "torch_dtype": str(dtype).removeprefix("torch."),
            "nanoemo": {key: getattr(cfg, key) for key in TRAINING_KEYS}}


def read_json(path):
    """A JSON file of a checkpoint folder; an empty or malformed one is a one-line error."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}): a damaged or incomplete "
                        "file?") from None


def resolve_folder(path):
    """A local checkpoint folder, or a hub id downloaded with huggingface_hub (needs a network)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download  # optional: only for hub ids
    except ImportError:
        raise UserError(f"no checkpoint at {path!r}: no such file or folder here, and downloading it as a "
                        "hub id needs huggingface_hub (pip install huggingface_hub) and a network") from None
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])


def open_tensors(path):
    """A safetensors file, memory-mapped; a truncated or foreign file is a one-line error."""
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError for an empty file)
        raise UserError(f"{path} is not a readable safetensors file ({error}): a truncated download?") from None


class TensorFiles:
    """Access by name to the tensors of one or several safetensors files. Each read maps its file anew and
    unmaps it after, so that a loaded model is held once in memory, not beside the pages of its files."""

    def __init__(self, folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map")
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            weight_map = None
        else:
            raise UserError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise UserError(f"{folder}: the index names {', '.join(missing)}, which {verb} not there (an incomplete "
                            "download?)")
        self.paths = {f: os.path.join(folder, f) for f in files}
        names = {}
        for f in files:  # every header read now: a damaged file is named before any work
            with open_tensors(self.paths[f]) as handle:
                names[f] = list(handle.keys())
        self.where = weight_map or {k: "model.safetensors" for k in names["model.safetensors"]}

    def get(self, name, shape):
        """The tensor called name, checked against the expected shape."""
        if name not in self.where:
            raise UserError(f"checkpoint has no tensor {name!r}")
        try:
            with open_tensors(self.paths[self.where[name]]) as handle:
                tensor = handle.get_tensor(name)
        except Exception as error:  # safetensors' own error type: a file shorter than its header says
            raise UserError(f"{self.where[name]}: cannot read {name} ({error}): a truncated file?") from None
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor


@torch.no_grad()
def load_hf(path, device="cpu", dtype=None, name=None, eval_doc_attention=False):
    """An EMO model (eval mode) from a release-format folder or hub id, in the checkpoint's dtype unless
    dtype is given; name (default: the path's last part) tells the release's StdMoE baseline from EMO. It
    attends causally at inference, as the release's code does (eval_doc_attention=True: within documents).
    Parameters are allocated once and filled tensor by tensor from memory-mapped files, so loading never
    holds two copies of the model."""
    folder = resolve_folder(path)
    hf = read_json(os.path.join(folder, "config.json"))
    cfg = config_from_hf(hf, os.path.basename(os.path.normpath(name or path)), eval_doc_attention)
    dtype = dtype or checkpoint_dtype(hf)
    with torch.device("meta"):
        model = EMO(cfg)
    model.to(dtype).to_empty(device=device)
    tensors = TensorFiles(folder)
    params = dict(model.named_parameters())
    for hf_name, name in OUTSIDE_LAYERS:
        params[name].copy_(tensors.get(hf_name, params[name].shape))
    for i, block in enumerate(model.layers):
        load_block(tensors, block, i)
    return model.eval()


@torch.no_grad()
def load_block(tensors, block, i):
    """Fill block (allocated, model.Block) with layer i's tensors from TensorFiles."""
    params = dict(block.named_parameters())
    for hf_name, name in layer_names(i):
        params[name].copy_(tensors.get(hf_name, params[name].shape))
    C, H = block.moe.w_down.shape[2], block.moe.w_down.shape[1]
    for j in range(block.moe.w_up_gate.shape[0]):
        gate, up, down = expert_names(i, j)
        block.moe.w_up_gate[j, :, :H].copy_(tensors.get(gate, (H, C)).T)
        block.moe.w_up_gate[j, :, H:].copy_(tensors.get(up, (H, C)).T)
        block.moe.w_down[j].copy_(tensors.get(down, (C, H)).T)


def block_tensors(block, i, dtype):
    """{Hugging Face name: tensor} of block (model.Block) as layer i."""
    params = dict(block.named_parameters())
    out = {hf_name: params[name] for hf_name, name in layer_names(i)}
    moe, H = block.moe, block.moe.w_down.shape[1]
    for j in range(moe.w_up_gate.shape[0]):
        gate, up, down = expert_names(i, j)
        out[gate], out[up], out[down] = moe.w_up_gate[j, :, :H].T, moe.w_up_gate[j, :, H:].T, moe.w_down[j].T
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def hf_tensors(model, dtype, layers):
    """{Hugging Face name: tensor} of the given layers (plus embedding, norm and head with layer 0)."""
    params = dict(model.named_parameters())
    out = {hf_name: params[name].detach().to(dtype).contiguous() for hf_name, name in OUTSIDE_LAYERS} \
        if 0 in layers else {}
    for i in layers:
        out.update(block_tensors(model.layers[i], i, dtype))
    return out


@torch.no_grad()
def export_hf(model, folder, dtype=None, layers_per_shard=4, tokenizer=None, pruning=None, replace=False,
              extra=None):
    """Write model as config.json + safetensors in the release's format; sharded with an index beyond
    layers_per_shard layers, so that no more than a few layers are copied in memory at a time. With a
    tiktoken encoding, also tokenizer.json; with prune.py's record, pruning.json (write_metadata). The folder
    is written whole beside its place and renamed into it when complete (files.atomic_folder): a folder that
    holds anything is refused unless replace. extra: {file name: content} of more JSON files (a merge record)."""
    dtype = dtype or next(model.parameters()).dtype
    n_layer = model.cfg.n_layer
    groups = [list(range(s, min(s + layers_per_shard, n_layer))) for s in range(0, n_layer, layers_per_shard)]
    weight_map = {}
    with atomic_folder(folder, replace) as tmp:
        for g, layers in enumerate(groups):
            name = "model.safetensors" if len(groups) == 1 else f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
            shard = hf_tensors(model, dtype, layers)
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        write_metadata(tmp, model.cfg, dtype, weight_map if len(groups) > 1 else None, tokenizer, pruning)
        for name, content in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)


def read_pruning(folder):
    """The pruning record (prune.py's: domain, original_n_experts, source, layers [{"kept": routed ids}]) of a
    folder that nanoEMO pruned (its pruning.json), None for any other folder."""
    path = os.path.join(folder, "pruning.json")
    if not os.path.exists(path):
        return None
    saved = read_json(path)
    n_routed = saved["original_num_experts"] - saved["num_shared_experts"]
    return {**{k: saved.get(k) for k in ("domain", "method", "calibration", "source")},
            "original_n_experts": saved["original_num_experts"],
            "layers": [{"kept": [e for e in kept if e < n_routed]} for kept in saved["experts_kept_per_layer"]]}


RELEASE_METHODS = {"greedy": "greedy_layerwise", "easy_ep": "easy_ep", "random": "random"}


def release_pruning_metadata(pruning, cfg, kept):
    """The release's pruning_metadata.json for prune.py's record, with the fields the release's script for that
    method writes (docs/method.md): greedy_prune_layerwise.py, prune_hf_model.py (global, frequency),
    easy_ep_prune.py, random_prune.py, and greedy_prune_layerwise_variable.py where layers keep different
    counts. kept: the original ids kept in every layer, shared ones last."""
    method, counts = pruning.get("method"), [len(layer) for layer in kept]
    calibration = {"task": pruning.get("domain"), "split": pruning.get("split"),
                   "num_calibration": pruning.get("calib_examples"), "prune_seed": 0}
    record = {"original_model": pruning.get("source")}
    if len(set(counts)) > 1:
        record |= {"keep_k_per_layer": counts, "num_shared_experts": cfg.n_shared, "pruning_method": method,
                   **calibration}
    elif method in ("greedy", "easy_ep"):
        record |= {"prune_keep_k": counts[0], "num_shared_experts": cfg.n_shared,
                   "pruning_method": RELEASE_METHODS[method], **calibration, "num_shots_override": None}
    elif method == "random":
        record |= {"prune_keep_k": counts[0], "num_shared_experts": cfg.n_shared, "pruning_method": "random",
                   "seed": pruning.get("seed", 0)}
    else:  # global, frequency: prune_hf_model.py, from an activation file
        record |= {"prune_keep_k": counts[0], "num_shared_experts": cfg.n_shared,
                   "activation_file": pruning.get("calibration")}
    return {**record, "experts_kept_per_layer": kept}


def tokenizer_files(tokenizer, model_max_length):
    """{file name: content} of what transformers' AutoTokenizer reads beside tokenizer.json: eos and pad set
    (pad: <|pad|> where the tokenizer has one, else the EOS), no BOS, no token_type_ids."""
    names = {i: t for t, i in tokenizer._special_tokens.items()}
    eos = names[tokenizer.eot_token]
    pad = "<|pad|>" if "<|pad|>" in tokenizer._special_tokens else eos
    special = {"eos_token": eos, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def write_metadata(folder, cfg, dtype, weight_map=None, tokenizer=None, pruning=None):
    """Everything of a release-format folder but the weights: config.json, the shards' index (weight_map:
    {tensor name: file}, None for one file), for a tiktoken encoding tokenizer.json with the tokenizer_config.json
    and special_tokens_map.json transformers' AutoTokenizer reads, and for prune.py's record pruning.json (the
    original ids of the experts kept in every layer, shared ones last, how and for what they were chosen) and
    the release's pruning_metadata.json (release_pruning_metadata)."""
    if weight_map is not None:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype, pad_id(tokenizer)), f, indent=1)
    if tokenizer is not None:
        write_tokenizer_json(tokenizer, os.path.join(folder, "tokenizer.json"))
        for name, content in tokenizer_files(tokenizer, cfg.seq_len).items():
            with open(os.path.join(folder, name), "w") as f:
                json.dump(content, f, indent=1)
    if pruning is not None:
        n_original, n_shared = pruning["original_n_experts"], cfg.n_shared
        shared = list(range(n_original - n_shared, n_original))
        kept = [layer["kept"] + shared for layer in pruning["layers"]]
        with open(os.path.join(folder, "pruning.json"), "w") as f:
            json.dump({"experts_kept_per_layer": kept, "original_num_experts": n_original,
                       "num_shared_experts": n_shared,
                       **{k: pruning[k] for k in ("domain", "method", "calibration", "source") if k in pruning}},
                      f, indent=1)
        with open(os.path.join(folder, "pruning_metadata.json"), "w") as f:
            json.dump(release_pruning_metadata(pruning, cfg, kept), f, indent=2)
