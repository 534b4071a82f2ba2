"""
The routers of nanoEMO: which experts each token uses, and the auxiliary losses that train them.

Two routers share one code path (docs/method.md, "The document-pool router"):
- 'std': the standard top-k MoE router (the baseline). Every token picks its top k routed experts.
- 'emo': the document-pool router of EMO. All tokens of one document choose their experts from a shared
  pool: the top-P experts of the document by the sum of its tokens' router probabilities. P is drawn
  uniformly from [pool_min, pool_max] per document during training, fixed to pool_eval at evaluation
  (0: no pool, token routing as at inference). Experts outside the pool get logit -inf.
Then both: softmax over the routed experts, top k_r, weights are the probabilities themselves (not
renormalised), and the n_shared last experts are always added with weight 1. Where a pool is smaller
than k_r, the surplus picks lie outside it and carry weight 0.

Everything is vectorised: documents are numbered with a cumulative sum over EOS positions, their scores
are one segment sum (index_add_), their pools one sort; no Python loop over documents, no host sync.

Shapes as in model.py: N tokens, C model width, Er routed experts, kr routed experts per token, K = top_k.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def document_ids(idx, eos_id):
    """Number the documents of a batch of packed sequences: (B, T) token ids -> (B, T) document ids.

    An EOS closes its document (it belongs to the document it ends), a row's first token opens a new one,
    so a row's leading and trailing partial documents are documents of their own. Numbers run across the
    whole batch (0..D-1, D <= B*T), so two tokens share a document exactly when they share an id.
    """
    starts = torch.ones_like(idx, dtype=torch.bool)  # (B, T) True where a document begins
    starts[:, 1:] = idx[:, :-1] == eos_id
    return starts.flatten().cumsum(0).view_as(idx) - 1


def pool_mask(probs, doc_ids, pool_sizes):
    """Which routed experts each token may use: those in its document's pool.

    probs (N, Er) router probabilities, doc_ids (N,) in 0..N-1, pool_sizes (N,) the pool size of each
    document id (entries past the last document are unused). Returns a bool mask (N, Er).
    """
    N, Er = probs.shape
    scores = probs.new_zeros(N, Er).index_add_(0, doc_ids, probs)  # (N, Er) row d: summed probs of document d
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # (N, Er) 0 for each document's top expert
    in_pool = rank < pool_sizes[:, None]  # (N, Er) per document
    return in_pool[doc_ids]  # (N, Er) per token


def expert_counts(probs, routed_experts, n_routed):
    """Tokens sent to each routed expert: (Er,). probs (N, Er), routed_experts (N, kr). A pick of probability
    0 (a pool smaller than kr leaves a token fewer experts than kr) is not counted."""
    used = (probs.gather(1, routed_experts) > 0).flatten().to(probs.dtype)  # (N*kr,)
    return probs.new_zeros(n_routed).index_add_(0, routed_experts.flatten(), used)


def load_balancing_loss(probs, counts, k_routed, carried=None):
    """Switch-style load-balancing loss over the data-parallel batch: 1.0 for perfectly uniform routing.

    probs (N, Er) router probabilities, counts (Er,) this rank's tokens per expert (expert_counts).
    loss = Er / kr * sum_e f_e * p_e, with f_e the fraction of tokens sent to expert e (sums to kr) counted
    over all data-parallel ranks of this micro-batch (the counts and the token count are all-reduced, as in
    the release), and p_e this rank's mean probability of e (which carries the gradient). carried (Er + 1,),
    the counts and token count of the step's earlier micro-batches (lb_scope 'step'), adds them to f_e's.
    Returns the loss and this micro-batch's counts summed over ranks (Er,).
    """
    N, Er = probs.shape
    counts_and_total = torch.cat([counts, probs.new_full((1,), N)])  # (Er + 1,) all-reduced together
    if dist.is_initialized():
        dist.all_reduce(counts_and_total)  # balance is asked of all ranks' tokens, not of one rank's
    seen = counts_and_total if carried is None else counts_and_total + carried
    fraction = seen[:-1] / seen[-1]  # (Er,)
    return Er / k_routed * (fraction * probs.mean(0)).sum(), counts_and_total[:-1]


def z_loss(logits):
    """Router z-loss: mean over tokens of logsumexp(logits)^2, keeps router logits small. logits (N, Er);
    -inf entries (experts outside a document's pool) take no part, as in the release's EMO."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class Routing:
    """What a router returns for N tokens: the experts to run and the terms a training loop needs."""

    weights: torch.Tensor  # (N, K) float32, routed experts first, then the shared ones with weight 1
    experts: torch.Tensor  # (N, K) int64 expert indices
    lb_loss: torch.Tensor  # scalar, before its weight (0 where no gradient is taken)
    z_loss: torch.Tensor  # scalar, before its weight
    expert_counts: torch.Tensor  # (Er,) tokens sent to each routed expert (summed over data-parallel ranks
    #                               when training)
    pool_size: torch.Tensor  # scalar: mean pool size over this batch's documents (Er when no pool is used)


class Router(nn.Module):
    """Chooses the experts of every token of one MoE layer of n_experts experts, as cfg (model.ModelConfig)
    says: cfg.router 'emo' routes within document pools, 'std' does not. The layer's sizes come from its
    gate's shape alone, so that slicing the gate (prune.py) is all it takes to prune the router."""

    def __init__(self, cfg, n_experts):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, n_experts, bias=False)  # one logit per expert, shared experts last
        self.n_shared, self.top_k = cfg.n_shared, cfg.top_k
        self.kind, self.pool_min, self.pool_max, self.pool_eval = cfg.router, cfg.pool_min, cfg.pool_max, cfg.pool_eval
        self.carried = None  # (Er + 1,) counts and tokens of the step's earlier micro-batches (train.py sets it)

    @property
    def n_routed(self):
        """Er: the routed experts of this layer."""
        return self.gate.weight.shape[0] - self.n_shared

    @property
    def k_routed(self):
        """kr: routed experts per token, top_k capped at the experts there are, less the shared ones."""
        return min(self.top_k, self.gate.weight.shape[0]) - self.n_shared

    def pool_sizes(self, n, device):
        """Pool size for each of up to n documents, or None where this call routes token by token: the
        standard router, and EMO in eval mode without a fixed pool_eval."""
        if self.kind == "std":
            return None
        if self.training:
            return torch.randint(self.pool_min, self.pool_max + 1, (n,), device=device)
        if self.pool_eval > 0:
            return torch.full((n,), self.pool_eval, device=device)
        return None

    def logits(self, x):
        """Router logits of the routed experts, float32: x (N, C) -> (N, Er). Shared experts take no part."""
        with torch.autocast(x.device.type, enabled=False):  # router logits in float32 (docs/method.md, step 1)
            return F.linear(x.float(), self.gate.weight[: self.n_routed].float())

    def forward(self, x, doc_ids):
        """x (N, C) token states, doc_ids (N,) document ids from document_ids(), or None to route token by token
        (a KV cache holds no whole documents to pool over). Returns a Routing."""
        N = x.shape[0]
        routed_logits = self.logits(x)  # (N, Er)
        sizes = None if doc_ids is None else self.pool_sizes(N, x.device)
        pool_size = torch.tensor(float(self.n_routed), device=x.device)
        masked_logits = routed_logits
        if sizes is not None:
            with torch.no_grad():  # the pool choice itself passes no gradient
                in_pool = pool_mask(routed_logits.softmax(-1), doc_ids, sizes)
            masked_logits = routed_logits.masked_fill(~in_pool, float("-inf"))
            is_document = torch.arange(N, device=x.device) <= doc_ids[-1]  # (N,) ids in use
            pool_size = (sizes.clamp(max=self.n_routed) * is_document).sum() / is_document.sum()
        probs = masked_logits.softmax(-1)  # (N, Er) zero outside the pool
        weights, experts = probs.topk(self.k_routed, dim=-1)  # (N, kr) not renormalised
        counts = expert_counts(probs, experts, self.n_routed)
        lb_loss = probs.new_zeros(())
        if self.training and torch.is_grad_enabled():  # evaluation and no-grad passes skip the all-reduce
            lb_loss, counts = load_balancing_loss(probs, counts, self.k_routed, self.carried)
        shared = torch.arange(self.n_routed, self.n_routed + self.n_shared, device=x.device)
        experts = torch.cat([experts, shared.expand(N, -1)], dim=1)  # (N, K)
        weights = torch.cat([weights, weights.new_ones(N, self.n_shared)], dim=1)  # (N, K)
        return Routing(weights, experts, lb_loss, z_loss(masked_logits), counts, pool_size)
