"""
Train an EMO (or standard) MoE language model: one loop from a CPU toy to the 1B-active/14B-total config.

    python train.py config/emo_tiny.py                          # one CPU or GPU
    python train.py config/emo_tiny.py --max_steps=100 --lr=1e-3
    torchrun --nproc_per_node=8 train.py config/emo_full.py     # N GPUs (NCCL) or N CPU processes (gloo)
    python train.py config/emo_tiny.py --init_from=resume       # continue out_dir/ckpt.pt exactly

The loop: AdamW (weight decay on everything but the input embedding, as the release), linear warmup then
cosine to min_lr_ratio * lr (and, with anneal_steps, linear to 0 at the end, as the release's anneal),
gradient accumulation, grad clipping, bf16 autocast on CUDA, optional torch.compile (--compile=True) and
activation checkpointing per block (--activation_checkpointing=True), DDP or FSDP2 (parallel.py). The
load-balancing loss is global: every router all-reduces its expert counts over the data-parallel group on
every micro-batch (router.py). Per-domain validation loss every eval_interval. A run holds its out_dir
(files.RunLock: a second run there is refused); checkpoints are atomic and carry the optimizer, RNG states and
data position, so a resumed run reproduces the losses of an uninterrupted one; a non-finite loss or gradient
stops the run before the update and a non-finite weight is never saved; SIGINT and SIGTERM end the run at the
next step boundary with a checkpoint and exit status 130 / 143. out_dir/ holds ckpt.pt, log.txt, history.json.
"""

import dataclasses
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

from checkpoint import (CHECKPOINT_NAME, check_shapes, load_checkpoint, load_full_state, model_config, resume_run,
                        save_run)
from configurator import parse_args
from data.corpus import Corpus, TrainWindows, expand_train_files
from data.tokenizer import tokenizer_record
from errors import UserError, run_command
from eval import evaluate_domains
from files import RunLock
from kernels import expert_path
from model import EMO, ModelConfig
from parallel import any_rank, build_model, leave_process_group, peak_flops, setup_distributed


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
    anneal_steps: int = 0  # then the last anneal_steps decay linearly to 0 (the release's final anneal)
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

    def __post_init__(self):
        checks = [(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}"),
                  (self.dtype in ("auto", "bfloat16", "float32"), f"dtype must be auto, bfloat16 or float32, got "
                   f"{self.dtype!r}"),
                  (self.lr >= 0 and 0 <= self.min_lr_ratio <= 1, f"lr must be >= 0 and min_lr_ratio in [0, 1], got "
                   f"{self.lr} and {self.min_lr_ratio}"),
                  (self.weight_decay >= 0 and self.grad_clip > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                   "weight_decay must be >= 0, grad_clip > 0, beta1 and beta2 in [0, 1)"),
                  (not self.anneal_steps or self.warmup_steps + self.anneal_steps <= self.max_steps,
                   "warmup_steps + anneal_steps must not exceed max_steps")]
        at_least = {1: ("batch_size", "grad_accum", "max_steps", "log_interval", "checkpoint_interval", "eval_tokens"),
                    0: ("stop_after", "warmup_steps", "eval_interval", "anneal_steps")}
        checks += [(getattr(self, key) >= low, f"{key} must be at least {low}, got {getattr(self, key)}")
                   for low, keys in at_least.items() for key in keys]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        checkpoint = os.path.join(self.out_dir, CHECKPOINT_NAME)
        if self.init_from == "resume" and not os.path.exists(checkpoint):
            raise UserError(f"init_from='resume' but there is no {checkpoint}")
        if self.init_from != "resume" and os.path.exists(checkpoint):
            raise UserError(f"{self.out_dir} already holds a run ({checkpoint}): continue it with --init_from=resume, "
                            "or give another out_dir")


# ---------------------------------------------------------------------------------------------------------
# Set-up: everything that can fail is checked before anything is written.

def resolve_model_config(cfg, model_cfg, given):
    """(model config, starting checkpoint or None): the run's own config, or a checkpoint's with the keys
    given explicitly applied on top."""
    if cfg.init_from == "scratch":
        return model_cfg, None
    path = os.path.join(cfg.out_dir, CHECKPOINT_NAME) if cfg.init_from == "resume" else cfg.init_from
    ckpt = load_checkpoint(path)
    explicit = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name in given}
    return dataclasses.replace(model_config(ckpt, path), **explicit), ckpt


def training_data(cfg, model_cfg):
    """(corpus or None, training files, their dtype): the corpus's train.bin, or train_files."""
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
    return corpus, files, dtype


def run_tokenizer(cfg, corpus, ckpt):
    """The tokenizer record checkpoints carry: the one given, else the corpus's, else the starting checkpoint's."""
    if cfg.tokenizer:
        return tokenizer_record(cfg.tokenizer)
    if corpus is not None:
        return tokenizer_record(corpus.tokenizer_spec())
    return None if ckpt is None else ckpt.get("tokenizer")


class Logger:
    """print0 and out_dir/log.txt, plus wandb when asked."""

    def __init__(self, cfg, rank, run_config):
        self.active, self.file, self.wandb = rank == 0, None, None
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


def configure_optimizer(model, cfg, device):
    """AdamW; weight decay on every parameter but the input embedding (norms included), as the release."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.startswith("embed.") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


@dataclass
class Run:
    """What a training run holds; the step, evaluation and checkpoint below read and advance it."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype
    log: Logger
    model: torch.nn.Module  # what is called: compiled and/or wrapped for data parallelism
    raw: EMO  # the bare module
    optimizer: torch.optim.Optimizer
    windows: TrainWindows
    corpus: Corpus
    tokenizer: dict
    lock: RunLock  # rank 0's hold on out_dir (None on the other ranks)
    step: int = 0
    history: list = dataclasses.field(default_factory=list)  # every step's record, resumes included


def setup_run(cfg, model_cfg, corpus, files, dtype, tokenizer):
    rank, world, device = setup_distributed(cfg)
    lock = RunLock(cfg.out_dir) if rank == 0 else None  # before anything is written there
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else torch.float32
    log = Logger(cfg, rank, {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)})
    model, raw = build_model(model_cfg, cfg, device, world, autocast_dtype)
    optimizer = configure_optimizer(raw, cfg, device)
    windows = TrainWindows(files, dtype, model_cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
    torch.manual_seed(cfg.seed + rank)  # pool sizes differ between ranks, as their documents do
    return Run(cfg, model_cfg, rank, world, device, autocast_dtype, log, model, raw, optimizer, windows, corpus,
               tokenizer, lock)


def log_header(run, files):
    cfg, model_cfg = run.cfg, run.model_cfg
    total, active = run.raw.num_params()
    run.log(f"nanoEMO | python {platform.python_version()} | torch {torch.__version__} | device {run.device} x "
            f"{run.world} ({cfg.parallel if run.world > 1 else 'single process'})")
    path, reason = expert_path(run.device.type, run.autocast_dtype, (model_cfg.expert_hidden, model_cfg.d_model))
    run.log(f"dtype {run.autocast_dtype} ({'bf16 autocast' if run.autocast_dtype == torch.bfloat16 else 'float32'})"
            f" | expert kernel: {path} ({reason}) | compile {cfg.compile} | "
            f"activation checkpointing {cfg.activation_checkpointing}")
    run.log(f"model: {dataclasses.asdict(model_cfg)}")
    run.log(f"train: {dataclasses.asdict(cfg)}")
    run.log(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active | training files: {files}")


# ---------------------------------------------------------------------------------------------------------
# The loop's three actions: a step, an evaluation, a checkpoint (checkpoint.save_run).

def learning_rate(step, cfg):
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at max_steps - anneal_steps, then (the release's
    final anneal) linear to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    cosine_end = cfg.max_steps - cfg.anneal_steps
    if cfg.anneal_steps and step >= cosine_end:
        return cfg.lr * cfg.min_lr_ratio * (1 - (step - cosine_end + 1) / cfg.anneal_steps)
    progress = min((step - cfg.warmup_steps) / max(cosine_end - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


STEP_STATS = ("lm_loss", "lb_loss", "z_loss", "pool_size")  # the model's stats a step record keeps


def train_step(run):
    """One optimizer step over grad_accum micro-batches. Returns the step's record (rank-averaged)."""
    cfg, model, device = run.cfg, run.model, run.device
    lr = learning_rate(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    model.train()
    sums = {}  # name: the micro-batches' summed scalar
    counts = [0] * run.model_cfg.n_layer  # per layer, (Er,) tokens per routed expert
    carried = [0] * run.model_cfg.n_layer  # lb_scope 'step': per layer, the earlier micro-batches' counts, tokens
    for micro in range(cfg.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in run.windows.next_batch())
        for block, seen in zip(run.raw.layers, carried):
            block.moe.router.carried = seen if run.model_cfg.lb_scope == "step" and micro > 0 else None
        sync = micro == cfg.grad_accum - 1  # reduce gradients on the last micro-batch only
        if run.world > 1 and cfg.parallel == "ddp":
            model.require_backward_grad_sync = sync
        elif run.world > 1:
            run.raw.set_requires_gradient_sync(sync)
        with torch.autocast(device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype != torch.float32):
            loss, stats = model(x, y)
        (loss / cfg.grad_accum).backward()
        for name, value in {"loss": loss, **{k: stats[k] for k in STEP_STATS}}.items():
            sums[name] = sums[name] + value.detach() if name in sums else value.detach()
        counts = [total + c for total, c in zip(counts, stats["expert_counts"])]
        tokens = torch.tensor([x.numel() * run.world], device=device, dtype=torch.float32)
        carried = [seen + torch.cat([c.detach(), tokens]) for seen, c in zip(carried, stats["expert_counts"])]
    means = torch.stack(list(sums.values())) / cfg.grad_accum  # one tensor: one all-reduce
    if run.world > 1:
        dist.all_reduce(means)
        means /= run.world
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
    loss, norm = torch.stack([means[0], grad_norm.float()]).tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):  # checked before the update: nothing bad is kept
        message = (f"step {run.step}: the loss ({loss}) or the gradient norm ({norm}) is not finite; stopped before "
                   "the update, the last checkpoint kept: resume it with a lower lr")
        run.log(message)
        raise UserError(message)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    imbalance = torch.stack([c.max() / c.mean().clamp(min=1) for c in counts]).mean()  # max/mean per expert
    values = torch.cat([means, torch.stack([grad_norm.float(), imbalance])]).tolist()  # one host sync
    return {"step": run.step, "lr": lr, **dict(zip([*sums, "grad_norm", "imbalance"], values))}


def log_step(run, record, step_time, eta, flops_per_step, peak):
    tokens_per_s = run.cfg.batch_size * run.model_cfg.seq_len * run.cfg.grad_accum * run.world / step_time
    mfu = f"{flops_per_step / step_time / peak:.1%}" if peak else "-"
    max_steps = run.cfg.max_steps
    run.log(f"step {record['step']:05d}/{max_steps:05d} ({record['step'] / max_steps:.1%}) | "
            f"loss {record['loss']:.4f} | lb {record['lb_loss']:.3f} | z {record['z_loss']:.3f} | "
            f"lr {record['lr']:.2e} | pool {record['pool_size']:.1f} | imbalance {record['imbalance']:.2f} | "
            f"{step_time * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s | mfu {mfu} | eta {eta / 60:.1f} min",
            {**record, "tok_per_s": tokens_per_s}, record["step"])


def evaluate(run, record):
    """Per-domain validation loss, into the step's record and the log."""
    results = evaluate_domains(run.raw, run.corpus, "val", run.cfg.batch_size, run.cfg.eval_tokens, run.device,
                               run.autocast_dtype)
    record["val"] = {domain: r["loss"] for domain, r in results.items()}
    mean = sum(record["val"].values()) / len(record["val"])
    run.log(f"step {run.step:05d} | val loss {mean:.4f} | "
            + " | ".join(f"{d} {v:.3f}" for d, v in record["val"].items()),
            {f"val/{d}": v for d, v in record["val"].items()}, run.step)


# ---------------------------------------------------------------------------------------------------------

def train(argv):
    """Run training from command-line style arguments. Returns (bare model, this invocation's step records).
    Stopped by SIGINT or SIGTERM, it checkpoints and exits with 128 + the signal's number (130, 143), so that
    a scheduler tells a preempted run from a finished one."""
    (cfg, model_cfg), given = parse_args(argv, TrainConfig, ModelConfig)
    model_cfg, ckpt = resolve_model_config(cfg, model_cfg, given)
    expert_path("cpu", torch.float32, (model_cfg.expert_hidden, model_cfg.d_model))  # a bad NANOEMO_KERNEL fails here
    corpus, files, dtype = training_data(cfg, model_cfg)
    run = setup_run(cfg, model_cfg, corpus, files, dtype, run_tokenizer(cfg, corpus, ckpt))
    try:
        if ckpt is not None:
            check_shapes(run.raw, ckpt["model"], cfg.init_from)
            if cfg.init_from == "resume":
                resume_run(run, ckpt)
            else:
                load_full_state(run.raw, None, ckpt["model"])
        log_header(run, files)
        if ckpt is not None:
            run.log(f"initialised from {cfg.init_from} at step {run.step}")
        first_record = len(run.history)
        stopped_by = loop(run)
    finally:
        if run.lock is not None:
            run.lock.release()
    if stopped_by:
        raise SystemExit(128 + stopped_by)
    return run.raw, run.history[first_record:]


def loop(run):
    """Steps until max_steps (or stop_after), evaluating and checkpointing on the way. Returns the number of
    the signal that stopped it, 0 if none did."""
    cfg, model_cfg = run.cfg, run.model_cfg
    tokens_per_step = cfg.batch_size * model_cfg.seq_len * cfg.grad_accum
    flops_per_step = run.raw.flops_per_token(model_cfg.seq_len) * tokens_per_step
    peak = peak_flops(run.device, cfg.peak_flops)
    last_step = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    stop_requested = []  # SIGINT / SIGTERM end the run at the next step boundary, checkpointed
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    started, first_step = time.time(), run.step
    try:
        while run.step < last_step:
            t0 = time.time()
            record = train_step(run)
            step_time = time.time() - t0
            run.history.append(record)
            if run.step % cfg.log_interval == 0 or run.step == last_step:
                eta = (time.time() - started) / (run.step - first_step) * (last_step - run.step)
                log_step(run, record, step_time, eta, flops_per_step, peak)
            if run.corpus is not None and cfg.eval_interval and (run.step % cfg.eval_interval == 0
                                                                  or run.step == last_step):
                evaluate(run, record)
            stop = any_rank(bool(stop_requested), run.world, run.device)
            if run.step % cfg.checkpoint_interval == 0 or run.step == last_step or stop:
                save_run(run)
            if stop:
                run.log(f"stopped by signal at step {run.step}; checkpoint written, continue with --init_from=resume")
                return (stop_requested or [signal.SIGTERM])[0]  # another rank's signal: as a SIGTERM
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    run.log(f"done: step {run.step} in {(time.time() - started) / 60:.1f} min")
    return 0


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
