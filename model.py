"""
The EMO transformer: a decoder-only mixture-of-experts language model as released with
"EMO: Pretraining Mixture of Experts for Emergent Modularity" (Wang, Bhagia, Min, 2026).

    tokens -> embedding -> n_layer x [ x + attention(RMSNorm(x)),  x + MoE(RMSNorm(x)) ] -> RMSNorm -> LM head

- attention: multi-head, RoPE, no biases, no QK-norm; optionally masked within documents.
- MoE in every layer: n_experts SwiGLU experts. The last n_shared are always on with weight 1, the others
  are chosen per token by router.py (EMO's document-pool router or the standard top-k router) and run
  by kernels.py. Untied embedding and LM head, truncated-normal init.
See docs/method.md for the method, the release's numbers and where nanoEMO differs.

Shape letters used across the project:
    B batch, T sequence length, C model width (d_model), nh heads, hd head size (C // nh),
    N tokens (B*T), V vocabulary, E experts, Er routed experts (E - n_shared),
    K experts per token (top_k), kr routed experts per token (K - n_shared), H expert hidden size.

    from model import ModelConfig, EMO
    model = EMO(ModelConfig(vocab_size=4096, eos_id=0))
    loss, stats = model(idx, targets)        # training: the loss (logits are never all held at once), stats
    logits = model(idx)                      # inference: logits (B, T, V)

EMO is the name of the architecture; with router='std' the same class is the standard-MoE baseline.
Training draws EMO's pools, eval mode routes token by token (or with pools of pool_eval), as the release.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from kernels import moe_mlp
from lm_loss import lm_loss
from router import Router, document_ids


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    eos_id: int = 0  # closes every document; document pools and the attention mask come from it
    seq_len: int = 256  # longest sequence the model is used with
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    n_experts: int = 16  # all experts of a layer, the shared ones included (last indices)
    n_shared: int = 1
    top_k: int = 4  # experts per token, the shared ones included
    experts_per_layer: tuple = ()  # pruned models: experts of each layer (shared included); () = n_experts each
    expert_hidden: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    router: str = "emo"  # 'emo' (document pools) or 'std' (standard top-k)
    pool_min: int = 2  # EMO training: pool size drawn uniformly in [pool_min, pool_max] per document
    pool_max: int = 15
    pool_eval: int = 0  # EMO in eval mode: fixed pool size, 0 routes token by token
    doc_attention: bool = False  # mask attention within documents in training (the release does for EMO)
    eval_doc_attention: bool = True  # in eval mode too (the release serves causally: Hugging Face folders, False)
    lb_weight: float = 0.1  # load-balancing loss, global batch
    lb_scope: str = "micro_batch"  # balance each micro-batch (the release) or a 'step' (counts carried over)
    z_weight: float = 0.001  # router z-loss
    lm_z_weight: float = 0.0  # LM-head z-loss (1e-5 in the release)
    init_std: float = 0.02

    def __post_init__(self):
        sizes = {"vocab_size": self.vocab_size, "seq_len": self.seq_len, "n_layer": self.n_layer,
                 "n_head": self.n_head, "d_model": self.d_model, "expert_hidden": self.expert_hidden}
        checks = [
            (all(v >= 1 for v in sizes.values()), f"sizes must be at least 1, got {sizes}"),
            (self.d_model % self.n_head == 0 and (self.d_model // self.n_head) % 2 == 0,
             f"d_model {self.d_model} must split into n_head {self.n_head} heads of even size (RoPE)"),
            (0 <= self.n_shared < self.n_experts, f"n_shared {self.n_shared} must be in [0, n_experts)"),
            (self.n_shared < self.top_k <= self.n_experts,
             f"top_k {self.top_k} must exceed n_shared {self.n_shared} and be at most n_experts {self.n_experts}"),
            (self.router in ("emo", "std"), f"router must be 'emo' or 'std', got {self.router!r}"),
            (self.lb_scope in ("micro_batch", "step"), f"lb_scope must be micro_batch or step, got {self.lb_scope!r}"),
            (1 <= self.pool_min <= self.pool_max,
             f"need 1 <= pool_min <= pool_max, got {self.pool_min}, {self.pool_max}"),
            (self.pool_eval >= 0, f"pool_eval must be >= 0, got {self.pool_eval}"),
            (0 <= self.eos_id < self.vocab_size, f"eos_id {self.eos_id} outside the vocabulary {self.vocab_size}"),
            (len(self.experts_per_layer) in (0, self.n_layer)
             and all(self.n_shared < e <= self.n_experts for e in self.experts_per_layer),
             f"experts_per_layer {self.experts_per_layer} must give each of the {self.n_layer} layers more than "
             f"n_shared {self.n_shared} and at most n_experts {self.n_experts} experts"),
            (not self.experts_per_layer or max(self.experts_per_layer) == self.n_experts,
             f"n_experts {self.n_experts} must be the largest of experts_per_layer {self.experts_per_layer}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.experts_per_layer = tuple(self.experts_per_layer)  # a list when read back from JSON

    def layer_experts(self):
        """Experts of each layer, shared included: n_experts everywhere unless pruned per layer."""
        return list(self.experts_per_layer) or [self.n_experts] * self.n_layer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_size, T, theta, device, start=0):
    """cos and sin tables (T, hd) of rotary embeddings for positions start..start+T-1, halves layout (as in
    the Hugging Face release)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    positions = torch.arange(start, start + T, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hd) by position: pairs are (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention_mask(doc_ids, n_queries, within_documents):
    """Which keys the last n_queries positions may attend to, given the document ids of all positions
    doc_ids (B, S): causal, and within documents when asked. Returns bool (B or 1, 1, Q, S), True = may."""
    S = doc_ids.shape[1]
    query_positions = torch.arange(S - n_queries, S, device=doc_ids.device)[:, None]  # (Q, 1)
    mask = (torch.arange(S, device=doc_ids.device)[None] <= query_positions)[None]  # (1, Q, S)
    if within_documents:
        mask = mask & (doc_ids[:, -n_queries:, None] == doc_ids[:, None, :])  # (B, Q, S)
    return mask[:, None]


class LayerCache:
    """One layer's keys and values (B, nh, S, hd) for the positions computed so far."""

    def __init__(self, shape, device, dtype):
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored

    def add(self, k, v):
        """Store the keys and values (B, nh, T, hd) of the new positions; all so far (B, nh, length + T, hd)."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer for the positions generated so far, and their tokens (for document
    boundaries), up to positions (default seq_len): with it a new token costs one position, not the whole
    context. A cached model routes token by token: the cache holds no whole documents to pool over."""

    def __init__(self, cfg, batch_size, device, dtype, positions=None):
        positions = positions or cfg.seq_len
        shape = (batch_size, cfg.n_head, positions, cfg.d_model // cfg.n_head)  # (B, nh, S, hd)
        self.layers = [LayerCache(shape, device, dtype) for _ in range(cfg.n_layer)]
        self.tokens = torch.zeros(batch_size, positions, dtype=torch.long, device=device)
        self.length = 0  # positions stored

    def add_tokens(self, idx):
        """Record the new tokens idx (B, T); returns the position of the first and all tokens so far (B, S)."""
        start, end = self.length, self.length + idx.shape[1]
        if end > self.tokens.shape[1]:
            raise ValueError(f"the cache holds {self.tokens.shape[1]} positions, {end} were asked")
        self.tokens[:, start:end] = idx
        self.length = end
        return start, self.tokens[:, :end]

    def repeat_interleave(self, repeats):
        """Each sequence's cache, repeats times in a row (batch B -> B * repeats): several continuations of one
        context then share the context's keys and values instead of computing it again (tasks.py)."""
        for layer in self.layers:
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
        self.tokens = self.tokens.repeat_interleave(repeats, dim=0)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.d_model
        self.n_head = cfg.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(C, C, bias=False) for _ in range(4))

    def forward(self, x, cos, sin, attn_mask, cache=None):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.add(k, v)  # (B, nh, S, hd) every position so far
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MoE(nn.Module):
    """n_experts SwiGLU experts and their router; top_k is capped at the experts there are."""

    def __init__(self, cfg, n_experts):
        super().__init__()
        E, C, H = n_experts, cfg.d_model, cfg.expert_hidden
        self.router = Router(cfg, E)
        self.w_up_gate = nn.Parameter(torch.empty(E, C, 2 * H))  # gate then up projection, input x output
        self.w_down = nn.Parameter(torch.empty(E, H, C))
        self.decoding = False  # laid out for decoding (EMO.for_decoding)

    def forward(self, x, doc_ids):
        """x (B, T, C), doc_ids (B, T) or None (token routing) -> (MoE output (B, T, C), Routing)."""
        B, T, C = x.shape
        routing = self.router(x.view(-1, C), None if doc_ids is None else doc_ids.flatten())
        y = moe_mlp(x.view(-1, C), self.w_up_gate, self.w_down, routing.weights, routing.experts,
                    self.decoding)  # (N, C)
        return y.view(B, T, C), routing

    @torch.no_grad()
    def for_decoding(self):
        """The same weights stored output x input (shapes and values unchanged, the strides of a transpose), so
        that a token's product with an expert reads its rows in order; decoding then takes moe_mlp_decode."""
        for name in ("w_up_gate", "w_down"):
            stored = getattr(self, name).transpose(1, 2).contiguous()  # (E, out, in)
            setattr(self, name, nn.Parameter(stored.transpose(1, 2), requires_grad=False))
        self.decoding = True


class Block(nn.Module):
    def __init__(self, cfg, n_experts):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg, n_experts)

    def attend(self, x, cos, sin, attn_mask, cache=None):
        """The block's first half: x + attention(RMSNorm(x))."""
        return x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache)

    def forward(self, x, cos, sin, attn_mask, doc_ids, cache=None):
        x = self.attend(x, cos, sin, attn_mask, cache)
        y, routing = self.moe(self.moe_norm(x), doc_ids)
        return x + y, routing


class EMO(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, n_experts) for n_experts in cfg.layer_experts())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Truncated normal (std init_std, cut at 3 std) for every matrix, ones for the norms.
        Called by the constructor, or after to_empty() when the model was built on the meta device."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)

    def num_params(self):
        """(total, active) parameter counts; active = what one token uses (kr of the Er routed experts)."""
        cfg = self.cfg
        total = sum(p.numel() for p in self.parameters())
        per_expert = 3 * cfg.d_model * cfg.expert_hidden
        unused = sum(E - min(cfg.top_k, E) for E in cfg.layer_experts()) * per_expert  # routed experts left idle
        return total, total - unused

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward): 6 per active matmul weight, plus attention scores.
        The embedding lookup is no matmul; the LM head is."""
        cfg = self.cfg
        active_matmul = self.num_params()[1] - self.embed.weight.numel()
        return 6 * active_matmul + 12 * cfg.n_layer * cfg.d_model * T

    def layer_inputs(self, idx, cache=None):
        """What every block takes for the tokens idx (B, T): (embeddings x (B, T, C), RoPE cos and sin (T, hd),
        the attention mask (None: causal), the router's document ids (B, T) (None: token routing))."""
        T = idx.shape[1]
        start, all_tokens = (0, idx) if cache is None else cache.add_tokens(idx)
        all_doc_ids = document_ids(all_tokens, self.cfg.eos_id)  # (B, S)
        within = self.cfg.doc_attention and (self.training or self.cfg.eval_doc_attention)
        attn_mask = None  # causal attention, the fast path
        if within or cache is not None:
            attn_mask = attention_mask(all_doc_ids, T, within)
        cos, sin = rope_tables(self.cfg.d_model // self.cfg.n_head, T, self.cfg.rope_theta, idx.device, start)
        doc_ids = all_doc_ids if cache is None else None  # a cache holds no whole documents to pool over
        return self.embed(idx), cos, sin, attn_mask, doc_ids

    def hidden_states(self, idx, cache=None):
        """The transformer without its head: idx (B, T) -> (final hidden states (B, T, C) after the last
        RMSNorm, stats). With a KVCache, idx are the tokens after those cached. stats: lb_loss, z_loss
        (averaged over layers), expert_counts (one (Er,) tensor per layer), pool_size. (Callers that need the
        logits of a few positions only apply lm_head to those.)"""
        x, cos, sin, attn_mask, doc_ids = self.layer_inputs(idx, cache)
        routings = []
        for i, block in enumerate(self.layers):
            x, routing = block(x, cos, sin, attn_mask, doc_ids, None if cache is None else cache.layers[i])
            routings.append(routing)
        stats = {
            "lb_loss": torch.stack([r.lb_loss for r in routings]).mean(),
            "z_loss": torch.stack([r.z_loss for r in routings]).mean(),
            "expert_counts": [r.expert_counts for r in routings],  # a list: pruned layers may differ in size
            "pool_size": torch.stack([r.pool_size for r in routings]).mean(),
        }
        return self.norm(x), stats

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V) float32. With targets (B, T) (next tokens, -1 = ignore):
        (loss to optimise, stats) instead, the loss made a chunk of logits at a time (lm_loss.py), never
        holding all of them. stats: those of hidden_states, lm_loss (cross-entropy) and lm_z_loss (means over the
        targets), and lm_correct (how many targets get the highest logit: next-token accuracy's count)."""
        x, stats = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(x).float()
        lm, stats["lm_loss"], stats["lm_z_loss"], stats["lm_correct"] = lm_loss(
            x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), self.cfg.lm_z_weight)
        loss = lm + self.cfg.lb_weight * stats["lb_loss"] + self.cfg.z_weight * stats["z_loss"]
        return loss, stats

    def for_decoding(self):
        """Every MoE's weights laid out for decoding (MoE.for_decoding): the same model, faster a token at a
        time. Returns the model."""
        for block in self.layers:
            block.moe.for_decoding()
        return self

    @torch.inference_mode()  # no_grad, and no autograd bookkeeping on the tensors made: less time per operation
    def generate(self, idx, max_new_tokens, temperature=1.0, sample_top_k=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T) in eval mode (token routing, as the release at inference).
        temperature 0 takes the most likely token; sample_top_k keeps only the most likely tokens. With
        use_cache a KVCache makes each new token cost one position while the sequence fits in seq_len; past
        it the context window slides (positions change: nothing to reuse), as without the cache."""
        cache = None
        with eval_mode(self):
            for _ in range(max_new_tokens):
                if use_cache and idx.shape[1] <= self.cfg.seq_len:
                    if cache is None:  # the prompt, all at once
                        cache = KVCache(self.cfg, idx.shape[0], idx.device, self.embed.weight.dtype)
                        logits = self(idx, cache=cache)
                    else:
                        logits = self(idx[:, -1:], cache=cache)
                else:
                    logits = self(idx[:, -self.cfg.seq_len:])
                next_token = pick_token(logits[:, -1], temperature, sample_top_k)  # (B, 1)
                idx = torch.cat([idx, next_token], dim=1)
        return idx


def pick_token(logits, temperature, sample_top_k):
    """The next token (B, 1) from the last position's logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if sample_top_k is not None:
        kth = logits.topk(min(sample_top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1)


# Routing follows the mode: training draws pools, eval mode routes by token, fine-tuning uses token_routing.

@contextmanager
def eval_mode(model):
    """model in eval mode inside the block, its mode restored after, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def token_routing(model):
    """Every router acts as the standard one inside the block (no pools, in training too, as the release
    fine-tunes after pruning); each router's own kind is restored after, whatever happens."""
    routers = [block.moe.router for block in model.layers]
    kinds = [router.kind for router in routers]
    for router in routers:
        router.kind = "std"
    try:
        yield model
    finally:
        for router, kind in zip(routers, kinds):
            router.kind = kind
