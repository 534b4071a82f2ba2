"""Router tests: the vectorised document pools against a naive per-document loop (the losses: test_router_losses.py).

    python -m pytest tests/test_router.py -q
"""

import pytest
import torch

from model import ModelConfig
from router import Router, document_ids, pool_mask

EOS = 0


def naive_documents(idx):
    """Lists of flat token positions, one per document, by walking every row token by token."""
    B, T = idx.shape
    documents = []
    for b in range(B):
        current = []
        for t in range(T):
            current.append(b * T + t)
            if idx[b, t] == EOS:
                documents.append(current)
                current = []
        if current:
            documents.append(current)
    return documents


def naive_route(logits, documents, pool_sizes, k_routed):
    """Per-document loop: pool = top-P experts of the summed softmax, -inf outside, softmax, top-k."""
    masked = torch.full_like(logits, float("-inf"))
    for d, positions in enumerate(documents):
        score = logits[positions].softmax(-1).sum(0)
        pool = score.topk(min(int(pool_sizes[d]), logits.shape[1])).indices
        masked[torch.tensor(positions)[:, None], pool[None, :]] = logits[positions][:, pool]
    probs = masked.softmax(-1)
    weights, experts = probs.topk(k_routed, dim=-1)
    return masked, weights, experts


def batches():
    """Token batches covering the edge cases: many short documents, one document over the whole row,
    EOS at position 0 and at the last position, batch > 1."""
    g = torch.Generator().manual_seed(0)
    many_short = torch.randint(1, 50, (3, 64), generator=g)
    many_short[torch.rand(3, 64, generator=g) < 0.2] = EOS
    no_eos = torch.randint(1, 50, (2, 40), generator=g)
    edges = torch.randint(1, 50, (2, 33), generator=g)
    edges[:, 0] = EOS
    edges[:, -1] = EOS
    edges[1, 10] = EOS
    return [many_short, no_eos, edges]


def make_router(kind="emo", n_experts=17, n_shared=1, top_k=5, pool=(2, 9), pool_eval=0, d_model=12, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=d_model, n_head=1, n_experts=n_experts, n_shared=n_shared, top_k=top_k, router=kind,
                      pool_min=pool[0], pool_max=pool[1], pool_eval=pool_eval)
    return Router(cfg, n_experts)


@pytest.mark.parametrize("idx", batches())
def test_document_ids_match_naive_walk(idx):
    ids = document_ids(idx, EOS).flatten()
    documents = naive_documents(idx)
    assert ids.max().item() == len(documents) - 1
    for d, positions in enumerate(documents):
        assert (ids[positions] == d).all()


@pytest.mark.parametrize("idx", batches())
def test_pool_mask_matches_naive_loop(idx):
    N, Er = idx.numel(), 16
    logits = torch.randn(N, Er, generator=torch.Generator().manual_seed(1))
    sizes = torch.randint(1, Er + 3, (N,), generator=torch.Generator().manual_seed(2))
    documents = naive_documents(idx)
    masked, _, _ = naive_route(logits, documents, sizes, 1)
    mask = pool_mask(logits.softmax(-1), document_ids(idx, EOS).flatten(), sizes)
    assert torch.equal(mask, masked > float("-inf"))


@pytest.mark.parametrize("idx", batches())
def test_emo_router_matches_naive_loop(idx):
    router = make_router()
    router.train()
    N, Er, kr = idx.numel(), router.n_routed, router.k_routed
    sizes = torch.randint(2, 10, (N,), generator=torch.Generator().manual_seed(3))
    router.pool_sizes = lambda n, device: sizes[:n]  # fix the draw so the naive loop can use it
    x = torch.randn(N, 12)
    routing = router(x, document_ids(idx, EOS).flatten())
    masked, weights, experts = naive_route(router.gate(x)[:, :Er], naive_documents(idx), sizes, kr)
    assert torch.equal(routing.experts[:, :kr], experts)
    torch.testing.assert_close(routing.weights[:, :kr], weights)
    # every routed expert chosen with a weight lies in its document's pool (pools may be smaller than kr)
    in_pool = masked.gather(1, routing.experts[:, :kr]) > float("-inf")
    assert torch.equal(in_pool, routing.weights[:, :kr] > 0)
    # the reported mean pool size is that of the drawn sizes over the real documents
    n_docs = len(naive_documents(idx))
    assert routing.pool_size.item() == pytest.approx(sizes[:n_docs].float().mean().item())


def test_drawn_pool_sizes_in_range_and_cover_it():
    router = make_router(pool=(3, 7))
    router.train()
    sizes = router.pool_sizes(5000, "cpu")
    assert sizes.min().item() == 3 and sizes.max().item() == 7
    assert set(sizes.tolist()) == {3, 4, 5, 6, 7}


def test_fixed_pool_size_gives_every_document_a_pool_of_exactly_that_many():
    """config/emo_tiny_fixed.py's router (pool_min = pool_max = d): every document's tokens choose among exactly
    d routed experts, the d its summed probabilities rank first."""
    d, idx = 6, batches()[0]
    router = make_router(pool=(d, d))
    router.train()
    assert set(router.pool_sizes(1000, "cpu").tolist()) == {d}
    x = torch.randn(idx.numel(), 12)
    ids = document_ids(idx, EOS).flatten()
    routing = router(x, ids)
    assert routing.pool_size.item() == d
    probabilities = router.gate(x)[:, :router.n_routed].softmax(-1)
    for doc in ids.unique():
        tokens = ids == doc
        pool = set(probabilities[tokens].sum(0).topk(d).indices.tolist())
        chosen = routing.experts[tokens, :router.k_routed][routing.weights[tokens, :router.k_routed] > 0]
        assert set(chosen.tolist()) <= pool
        if tokens.sum() >= 8:  # a long document uses its whole pool
            assert set(chosen.tolist()) == pool


def test_pool_as_large_as_routed_experts_masks_nothing():
    idx = batches()[0]
    emo, std = make_router("emo", pool=(16, 40)), make_router("std")
    emo.train()
    x = torch.randn(idx.numel(), 12)
    ids = document_ids(idx, EOS).flatten()
    a, b = emo(x, ids), std(x, ids)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)
    assert a.pool_size.item() == 16  # effective size, capped at the 16 routed experts
    mask = pool_mask(torch.rand(idx.numel(), 16), ids, torch.full((idx.numel(),), 16))
    assert mask.all()


@pytest.mark.parametrize("kind", ["emo", "std"])
def test_shared_experts_always_chosen_with_weight_one(kind):
    router = make_router(kind, n_experts=12, n_shared=2, top_k=5, pool=(4, 9))
    router.train()
    idx = batches()[0]
    routing = router(torch.randn(idx.numel(), 12), document_ids(idx, EOS).flatten())
    assert routing.experts.shape == (idx.numel(), 5)
    assert (routing.experts[:, 3:] == torch.tensor([10, 11])).all()
    assert (routing.weights[:, 3:] == 1.0).all()
    assert (routing.experts[:, :3] < 10).all()
    # routing weights are softmax probabilities, not renormalised over the top-k
    assert (routing.weights[:, :3].sum(1) < 1).all()


def test_eval_pool_is_fixed_and_zero_means_token_routing():
    idx = batches()[0]
    ids = document_ids(idx, EOS).flatten()
    x = torch.randn(idx.numel(), 12)
    router = make_router(pool_eval=4)
    router.eval()
    assert (router.pool_sizes(10, "cpu") == 4).all()
    first, second = router(x, ids), router(x, ids)
    assert torch.equal(first.experts, second.experts) and first.pool_size.item() == 4
    token = make_router(pool_eval=0)
    token.eval()
    std = make_router("std")
    assert torch.equal(token(x, ids).experts, std(x, ids).experts)
    # without document ids (a KV cache) pools are ignored even in training
    router.train()
    assert torch.equal(router(x, None).experts, std(x, ids).experts)


def test_standard_router_ignores_documents():
    router = make_router("std")
    router.train()
    x = torch.randn(64, 12)
    one_document = torch.zeros(64, dtype=torch.long)
    many = torch.arange(64)
    a, b = router(x, one_document), router(x, many)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)
    assert a.pool_size.item() == 16
