"""Specialization measures (experiments/analyze.py): clustering recovers known clusters, entropies and similarities on
hand-made cases, and the command on a tiny model.

    python -m pytest tests/test_analyze.py -q
"""

import json
import math

import pytest
import torch

from experiments import analyze


def synthetic_routing(n_clusters=4, per_cluster=60, dim=40, noise=0.15, seed=0):
    """Router-probability-like rows around n_clusters distinct directions: (rows (N, dim), true labels (N,))."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n_clusters, dim, generator=g) ** 4  # peaked, non-negative, like probabilities
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    rows = centers[labels] + noise * torch.rand(len(labels), dim, generator=g)
    return rows / rows.sum(1, keepdim=True), labels


def test_clustering_recovers_known_clusters():
    rows, truth = synthetic_routing()
    unit = torch.nn.functional.normalize(analyze.pca(rows), dim=1)
    labels, centroids = analyze.spherical_kmeans(unit, 4)
    assert centroids.shape[0] == 4 and torch.allclose(centroids.norm(dim=1), torch.ones(4))
    # every found cluster is one true cluster and the reverse: a one-to-one match
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    domain_entropy, _ = analyze.cluster_entropies(labels, truth, torch.arange(len(truth)) % 7, 4)
    assert domain_entropy == pytest.approx(0.0, abs=1e-6)  # clusters are pure in the true labels


def test_pca_keeps_the_components_of_95_percent_of_the_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) @ torch.tensor([[10.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0], [0, 0, 0.1, 0, 0]])
    projected = analyze.pca(x)
    assert projected.shape == (500, 2)  # 100 + 9 of 109.01: two components hold > 95%


def test_entropies_on_hand_made_labels():
    # two clusters, each half domain 0 and half domain 1: domain entropy 1; each token type in one cluster: 0
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1] * 5)
    domains = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1] * 5)
    tokens = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9] * 5)
    assert analyze.cluster_entropies(labels, domains, tokens, 2) == pytest.approx((1.0, 0.0))
    assert analyze.normalised_entropy(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert analyze.normalised_entropy(torch.tensor([3.0, 0.0, 1.0, 0.0])) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))


def test_domain_similarity_is_the_cosine_of_mean_routing():
    usage = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # 3 domains, 1 layer, 2 experts
    similarity = analyze.domain_similarity(usage)
    torch.testing.assert_close(similarity[0], torch.tensor([[1.0, 0.0, 0.5 ** 0.5], [0.0, 1.0, 0.5 ** 0.5],
                                                            [0.5 ** 0.5, 0.5 ** 0.5, 1.0]]))
    assert analyze.mean_off_diagonal(similarity) == pytest.approx(2 * 0.5 ** 0.5 / 3)


def test_router_probabilities_are_the_routers_softmax(tiny_checkpoints):
    from checkpoint import load_model
    model, _ = load_model(tiny_checkpoints["emo"])
    idx = torch.randint(0, 300, (2, 16))
    probs = analyze.router_probabilities(model, [(idx, torch.ones_like(idx, dtype=torch.bool))])
    assert probs.shape == (32, 2, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(32, 2))


def test_analyze_command_writes_its_tables(tiny_corpus, tiny_checkpoints, tmp_path, capsys):
    analyze.main(["--ckpt", f"{tiny_checkpoints['emo']},{tiny_checkpoints['std']}", "--data_dir", tiny_corpus[0],
                  "--tokens", "64", "--clusters", "4", "--out", str(tmp_path)])
    saved = json.load(open(tmp_path / "specialization.json"))
    assert len(saved) == 2
    for r in saved.values():
        assert 0 <= r["cluster_domain_entropy"] <= 1 and 0 <= r["token_cluster_entropy"] <= 1
        assert len(r["similarity"]) == 2  # layers
    # the table gives each layer's mean similarity of two domains beside their mean over the layers
    row = next(line for line in open(tmp_path / "specialization.md") if line.startswith("| emo_run"))
    per_layer = [float(v) for v in row.split("|")[3].split(" / ")]
    similarity = torch.tensor(next(iter(saved.values()))["similarity"])
    assert per_layer == pytest.approx([analyze.mean_off_diagonal(s[None]) for s in similarity], abs=5e-4)
    assert float(row.split("|")[2]) == pytest.approx(sum(per_layer) / 2, abs=1e-3)
    assert open(tmp_path / "domain_similarity.png", "rb").read(4) == b"\x89PNG"
    assert "cluster entropy of a token type" in capsys.readouterr().out
