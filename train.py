"""
Train an EMO (or standard) MoE language model: one loop from a CPU toy to the 1B-active/14B-total config.

    python train.py config/emo_tiny.py                          # one CPU or GPU
    python train.py config/emo_tiny.py --max_steps=100 --lr=1e-3
    torchrun --nproc_per_node=8 train.py config/emo_full.py     # N GPUs (NCCL) or N CPU processes (gloo)
    python train.py config/emo_tiny.py --init_from=resume       # continue out_dir/ckpt.pt exactly

The loop: AdamW (weight decay on everything but the input embedding, as the release), linear warmup then
cosine to min_lr_ratio * lr, gradient accumulation, grad clipping, bf16 autocast on CUDA, optional
torch.compile (--compile=True) and activation checkpointing per block (--activation_checkpointing=True),
DDP or FSDP2 (`fully_shard` per block; with bf16, float32 master weights and float32 gradient reduction).
The load-balancing loss is global: every router all-reduces its expert counts over the data-parallel group
on every micro-batch (router.py). Per-domain validation loss every eval_interval. Checkpoints are atomic
and carry the optimizer, RNG states and data position, so a resumed run reproduces the losses of an
uninterrupted one; a NaN/inf loss stops the run without saving; SIGINT and SIGTERM end the run at the next
step boundary with a checkpoint. out_dir/ holds ckpt.pt, log.txt and history.json (every step's losses and
statistics, for plots). Memory and time of a config on N GPUs, before renting them: bench/plan.py.
"""

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import CHECKPOINT_NAME, atomic_write, check_shapes, load_checkpoint, save_checkpoint
from configurator import parse_args
from data.corpus import Corpus, TrainWindows, expand_train_files
from data.tokenizer import record_for
from errors import UserError, run_command
from eval import evaluate_domains
from kernels import kernel_choice
from model import EMO, ModelConfig


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    data_dir: str = "data/multidomain"  # corpus of data/prepare.py: meta.json, train.bin, val.bin
    train_files: str = ""  # instead of data_dir/train.bin: comma-separated paths/globs of token shards
    train_dtype: str = "uint32"  # dtype of raw train_files shards (OLMo's dolma2 tokens are uint32)
    tokenizer: str = ""  # recorded in checkpoints when training from train_files (gpt2, dolma2, a rank file...)
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt) or a checkpoint to start from
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    stop_after: int = 0  # end this invocation after this step, checkpointed (0: run to max_steps)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250  # per-domain validation loss every so many steps (0: never)
    eval_tokens: int = 8192  # validation tokens per domain
    log_interval: int = 10
    checkpoint_interval: int = 250  # and at the end of the run
    seed: int = 1337
    device: str = "auto"  # 'auto': cuda if available, else cpu
    dtype: str = "auto"  # 'auto': bfloat16 autocast on CUDA, float32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    parallel: str = "ddp"  # 'ddp' or 'fsdp' when launched with torchrun
    peak_flops: float = 0.0  # per device, for MFU; 0: looked up from the GPU name (none on CPU)
    wandb_log: bool = False
    wandb_project: str = "nanoemo"


# bf16 dense peak FLOP/s per device, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def setup_distributed(cfg):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else cfg.device if cfg.device != "auto" else "cpu")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


class Logger:
    """print0 and out_dir/log.txt, plus wandb when asked."""

    def __init__(self, cfg, rank, run_config):
        self.active = rank == 0
        self.file = None
        self.wandb = None
        if self.active:
            os.makedirs(cfg.out_dir, exist_ok=True)
            self.file = open(os.path.join(cfg.out_dir, "log.txt"), "a")
            if cfg.wandb_log:
                import wandb  # optional, only when asked for
                self.wandb = wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.out_dir),
                                        config=run_config)

    def __call__(self, line, metrics=None, step=None):
        if self.active:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()
            if self.wandb is not None and metrics:
                self.wandb.log(metrics, step=step)


def learning_rate(step, cfg):
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def configure_optimizer(model, cfg, device):
    """AdamW; weight decay on every parameter but the input embedding (norms included), as the release."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.startswith("embed.") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def build_model(model_cfg, cfg, device, world, compute_dtype=torch.float32):
    """The model on its device, wrapped for data parallelism. Returns (model to call, the bare module).
    FSDP2 shards every block and the rest; with bfloat16 compute it keeps float32 master weights, gathers
    bfloat16 copies for the forward and backward, and reduces gradients in float32."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.parallel == "fsdp" and world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        with torch.device("meta"):
            raw = EMO(model_cfg)
        for block in raw.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(raw, mp_policy=policy)
        raw.to_empty(device=device)
        raw.init_weights()
    else:
        with torch.device(device):
            raw = EMO(model_cfg)
    raw.activation_checkpointing = cfg.activation_checkpointing
    model = torch.compile(raw) if cfg.compile else raw
    if cfg.parallel == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, raw


def full_state(raw, optimizer):
    """Unsharded model (and optimizer) state on the CPU, whatever the parallelism; a collective under FSDP."""
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


def gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def resolve_model_config(cfg, model_cfg, given):
    """The model config: the run's own, or a checkpoint's with the keys given explicitly applied on top."""
    if cfg.init_from == "scratch":
        return model_cfg, None
    path = os.path.join(cfg.out_dir, CHECKPOINT_NAME) if cfg.init_from == "resume" else cfg.init_from
    ckpt = load_checkpoint(path)
    explicit = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name in given}
    return dataclasses.replace(ModelConfig(**ckpt["model_config"]), **explicit), ckpt


def validate(cfg, model_cfg, given):
    """Every check that can fail before anything is written: config values, data files, vocabulary."""
    if cfg.parallel not in ("ddp", "fsdp"):
        raise UserError(f"parallel must be 'ddp' or 'fsdp', got {cfg.parallel!r}")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {cfg.dtype!r}")
    kernel_choice(torch.device("cpu"))  # a bad NANOEMO_KERNEL fails here, before anything is written
    if cfg.init_from == "resume" and not os.path.exists(os.path.join(cfg.out_dir, CHECKPOINT_NAME)):
        raise UserError(f"init_from='resume' but there is no {os.path.join(cfg.out_dir, CHECKPOINT_NAME)}")
    model_cfg, ckpt = resolve_model_config(cfg, model_cfg, given)
    corpus = Corpus(cfg.data_dir) if cfg.data_dir else None
    if corpus is not None:
        corpus.check_model(model_cfg.vocab_size, model_cfg.eos_id)
    if cfg.train_files:
        files, dtype = expand_train_files(cfg.train_files), np.dtype(cfg.train_dtype)
    elif corpus is not None:
        files, dtype = corpus.train_files(), corpus.dtype
    else:
        raise UserError("no training data: set data_dir (a corpus of data/prepare.py) or train_files")
    for f in files:
        if not os.path.exists(f):
            raise UserError(f"training file not found: {f} (run `python -m data.prepare`?)")
    # the tokenizer checkpoints record: given, else the corpus's, else the starting checkpoint's
    tokenizer = (record_for(cfg.tokenizer) if cfg.tokenizer else corpus.tokenizer_record() if corpus is not None
                 else ckpt.get("tokenizer") if ckpt is not None else None)
    return model_cfg, ckpt, corpus, files, dtype, tokenizer


def log_header(log, cfg, model_cfg, raw, device, autocast_dtype, world, files):
    total, active = raw.num_params()
    log(f"nanoEMO | python {platform.python_version()} | torch {torch.__version__} | device {device} x {world} "
        f"({cfg.parallel if world > 1 else 'single process'})")
    kernel, reason = kernel_choice(device, autocast_dtype, (model_cfg.expert_hidden, model_cfg.d_model))
    log(f"dtype {autocast_dtype} ({'bf16 autocast' if autocast_dtype == torch.bfloat16 else 'float32'}) | "
        f"expert kernel: {kernel} ({reason}) | compile {cfg.compile} | "
        f"activation checkpointing {cfg.activation_checkpointing}")
    log(f"model: {dataclasses.asdict(model_cfg)}")
    log(f"train: {dataclasses.asdict(cfg)}")
    log(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active | training files: {files}")


class Run:
    """One training run's state, with the three things the loop does: a step, an evaluation, a checkpoint."""

    def __init__(self, cfg, model_cfg, corpus, files, dtype, tokenizer):
        self.cfg, self.model_cfg, self.corpus, self.tokenizer = cfg, model_cfg, corpus, tokenizer
        self.rank, self.world, self.device = setup_distributed(cfg)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.log = Logger(cfg, self.rank, {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)})
        self.model, self.raw = build_model(model_cfg, cfg, self.device, self.world, self.autocast_dtype)
        self.optimizer = configure_optimizer(self.raw, cfg, self.device)
        self.windows = TrainWindows(files, dtype, model_cfg.seq_len, cfg.batch_size, cfg.seed, self.rank, self.world)
        self.step = 0
        self.history = []  # every step's record since the run began, resumes included
        torch.manual_seed(cfg.seed + self.rank)  # pool sizes differ between ranks, as their documents do
        tokens_per_step = cfg.batch_size * model_cfg.seq_len * cfg.grad_accum
        self.flops_per_step = self.raw.flops_per_token(model_cfg.seq_len) * tokens_per_step
        self.peak_flops = cfg.peak_flops or next((v for k, v in PEAK_FLOPS.items() if self.device.type == "cuda"
                                                  and k in torch.cuda.get_device_name(self.device)), 0.0)

    def resume(self, ckpt):
        if ckpt.get("world", 1) != self.world:
            raise UserError(f"checkpoint written by {ckpt.get('world')} ranks, resuming with {self.world}: "
                            "RNG streams would differ; resume with the same number of ranks")
        load_full_state(self.raw, self.optimizer, ckpt["model"], ckpt["optimizer"])
        self.step = ckpt["step"]
        self.history = ckpt["history"]
        self.windows.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"][self.rank], self.device)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches. Returns the step's record (rank-averaged)."""
        cfg, model, device = self.cfg, self.model, self.device
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums = torch.zeros(5, device=device)  # loss, lm, lb, z, pool size, summed over micro-batches
        counts = [0] * self.model_cfg.n_layer  # per layer, (Er,) tokens per routed expert
        for micro in range(cfg.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in self.windows.next_batch())
            sync = micro == cfg.grad_accum - 1  # reduce gradients on the last micro-batch only
            if self.world > 1 and cfg.parallel == "ddp":
                model.require_backward_grad_sync = sync
            elif self.world > 1:
                self.raw.set_requires_gradient_sync(sync)
            with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32):
                _, loss, stats = model(x, y)
            (loss / cfg.grad_accum).backward()
            sums += torch.stack([loss.detach()] + [stats[k].detach() for k in ("lm_loss", "lb_loss", "z_loss",
                                                                             "pool_size")])
            counts = [total + c for total, c in zip(counts, stats["expert_counts"])]
        sums /= cfg.grad_accum
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        if not math.isfinite(sums[0].item()):
            self.log(f"step {self.step}: loss is {sums[0].item()}; stopping without saving (last good checkpoint kept)")
            raise FloatingPointError(f"non-finite loss {sums[0].item()} at step {self.step}")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        imbalance = torch.stack([c.max() / c.mean().clamp(min=1) for c in counts]).mean()  # max/mean per expert
        values = torch.cat([sums, torch.stack([grad_norm.float(), imbalance])]).tolist()  # one host sync
        record = dict(zip(["loss", "lm_loss", "lb_loss", "z_loss", "pool_size", "grad_norm", "imbalance"], values))
        return {"step": self.step, "lr": lr, **record}

    def log_step(self, record, step_time, eta):
        tokens_per_s = self.cfg.batch_size * self.model_cfg.seq_len * self.cfg.grad_accum * self.world / step_time
        mfu = f"{self.flops_per_step / step_time / self.peak_flops:.1%}" if self.peak_flops else "-"
        max_steps = self.cfg.max_steps
        self.log(f"step {record['step']:05d}/{max_steps:05d} ({record['step'] / max_steps:.1%}) | "
                 f"loss {record['loss']:.4f} | lb {record['lb_loss']:.3f} | z {record['z_loss']:.3f} | "
                 f"lr {record['lr']:.2e} | pool {record['pool_size']:.1f} | imbalance {record['imbalance']:.2f} | "
                 f"{step_time * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {mfu} | eta {eta / 60:.1f} min",
                 {**record, "tok_per_s": tokens_per_s}, record["step"])

    def evaluate(self, record):
        cfg = self.cfg
        results = evaluate_domains(self.raw, self.corpus, "val", self.model_cfg.seq_len, cfg.batch_size,
                                   cfg.eval_tokens, self.device, self.autocast_dtype)
        record["val"] = {domain: r["loss"] for domain, r in results.items()}
        mean = sum(record["val"].values()) / len(record["val"])
        self.log(f"step {self.step:05d} | val loss {mean:.4f} | "
                 + " | ".join(f"{d} {v:.3f}" for d, v in record["val"].items()),
                 {f"val/{d}": v for d, v in record["val"].items()}, self.step)

    def save(self):
        model_state, optim_state = full_state(self.raw, self.optimizer)
        rngs = gather_objects(rng_state(self.device), self.world)
        if self.rank == 0:
            save_checkpoint(os.path.join(self.cfg.out_dir, CHECKPOINT_NAME), {
                "model_config": dataclasses.asdict(self.model_cfg), "model": model_state,
                "optimizer": optim_state, "train_config": dataclasses.asdict(self.cfg), "step": self.step,
                "world": self.world, "data": self.windows.state_dict(), "rng": rngs, "history": self.history,
                "tokenizer": self.tokenizer})
            atomic_write(os.path.join(self.cfg.out_dir, "history.json"), lambda f: json.dump(self.history, f), "w")

    def any_rank(self, flag):
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return t.item() > 0


def loop(run):
    """Steps until max_steps (or stop_after, or a signal), logging, evaluating and checkpointing.
    Returns the records of this invocation's steps."""
    cfg = run.cfg
    last_step = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    stop_requested = []  # SIGINT / SIGTERM end the run at the next step boundary, checkpointed
    handler = lambda signum, frame: stop_requested.append(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    started, first_step, first_record = time.time(), run.step, len(run.history)
    try:
        while run.step < last_step:
            t0 = time.time()
            record = run.train_step()
            step_time = time.time() - t0
            run.history.append(record)
            if run.step % cfg.log_interval == 0 or run.step == last_step:
                eta = (time.time() - started) / (run.step - first_step) * (last_step - run.step)
                run.log_step(record, step_time, eta)
            if run.corpus is not None and cfg.eval_interval and (run.step % cfg.eval_interval == 0
                                                                  or run.step == last_step):
                run.evaluate(record)
            stop = run.any_rank(bool(stop_requested))
            if run.step % cfg.checkpoint_interval == 0 or run.step == last_step or stop:
                run.save()
            if stop:
                run.log(f"stopped by signal at step {run.step}; checkpoint written, continue with --init_from=resume")
                break
    finally:
        for sig, previous_handler in previous.items():
            signal.signal(sig, previous_handler)
    run.log(f"done: step {run.step} in {(time.time() - started) / 60:.1f} min")
    return run.history[first_record:]


def train(argv):
    """Run training from command-line style arguments. Returns (bare model, history of step records)."""
    (cfg, model_cfg), given = parse_args(argv, TrainConfig, ModelConfig)
    model_cfg, ckpt, corpus, files, dtype, tokenizer = validate(cfg, model_cfg, given)
    run = Run(cfg, model_cfg, corpus, files, dtype, tokenizer)
    if ckpt is not None and cfg.init_from == "resume":
        run.resume(ckpt)
    elif ckpt is not None:
        check_shapes(run.raw, ckpt["model"], cfg.init_from)
        load_full_state(run.raw, None, ckpt["model"])
    log_header(run.log, cfg, model_cfg, run.raw, run.device, run.autocast_dtype, run.world, files)
    if ckpt is not None:
        run.log(f"initialised from {cfg.init_from} at step {run.step}")
    return run.raw, loop(run)


def leave_process_group():
    """Leave together, then end the process without C++ static destructors: after a finished run, a gloo
    rank has aborted in them ('terminate called without an active exception'), failing a run that had
    written everything."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    try:
        train(sys.argv[1:] if argv is None else argv)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        leave_process_group()


if __name__ == "__main__":
    run_command(main)
