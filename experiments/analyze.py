"""
Semantic or syntactic specialization (the paper's Figs. 5-6): does a model's routing follow the domain of a
document, or the token itself? Two measures, on each domain's held-out text, routing token by token:

(a) Domain similarity: per layer, the cosine similarity between the domains' mean router probabilities
    (heatmaps at the first, middle and last layer). One number: the mean similarity of two different domains
    over the layers (the paper: low for EMO, high for the standard MoE), and its value at each layer.
(b) Token clustering: every token's router probabilities over all layers (N, n_layer * Er), PCA to 95% of the
    variance, L2-normalised, spherical k-means (k = 32). Then each cluster's domain entropy and each token
    type's cluster entropy (token types seen at least 5 times), both normalised to [0, 1] and averaged over
    tokens. Routing that follows the domain gives clusters of one domain (low domain entropy) that a token type
    is spread over (high token entropy); routing that follows the token gives the opposite.

    python -m experiments.analyze --ckpt out/emo_tiny,out/std_tiny --out out/analysis
"""

import argparse
import json
import math
import os

import numpy as np
import torch

from checkpoint import checkpoint_paths, load_model, model_name
from data.corpus import Corpus
from data.tokenizer import from_record
from data.user import document_batches
from errors import run_command
from experiments.report import pyplot
from prune import moe_calls


@torch.no_grad()
def router_probabilities(model, batches):
    """Every token's router probabilities in every layer: (N, n_layer, Er) for the batches' tokens in order."""
    per_batch = []
    for idx, _ in batches:
        calls = moe_calls(model, idx.to(model.embed.weight.device))
        probs = [block.moe.router.logits(moe_input.flatten(0, 1)).softmax(-1)  # (b*T, Er)
                 for block, (moe_input, _, _) in zip(model.layers, calls)]
        per_batch.append(torch.stack(probs, dim=1).cpu())
    return torch.cat(per_batch)


def domain_similarity(usage):
    """usage (D, L, Er) mean router probabilities -> (L, D, D) cosine similarity between domains per layer."""
    unit = torch.nn.functional.normalize(usage, dim=-1).transpose(0, 1)  # (L, D, Er)
    return unit @ unit.transpose(1, 2)


def mean_off_diagonal(similarity):
    """The mean similarity of two different domains over the layers: (L, D, D) -> float."""
    D = similarity.shape[1]
    off = ~torch.eye(D, dtype=torch.bool)
    return similarity[:, off].mean().item()


def pca(x, variance=0.95):
    """x (N, F) projected on its fewest principal components that keep the given fraction of its variance."""
    centered = x - x.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)  # v (F', F) rows are the components
    kept = int((s.square().cumsum(0) / s.square().sum() < variance).sum()) + 1
    return centered @ v[:kept].T


def spherical_kmeans(x, k, iterations=50, seed=0):
    """Cluster unit vectors x (N, d) by cosine: (labels (N,), centroids (k, d)). Initialised k-means++ style
    (each new centroid a point far, in cosine, from the ones chosen); an emptied cluster takes the point
    farthest from its centroid."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    while len(centroids) < k:
        distance = (1 - (x @ centroids.T).amax(1)).clamp(min=0) + 1e-12  # (N,)
        centroids = torch.cat([centroids, x[torch.multinomial(distance, 1, generator=g)]])
    for _ in range(iterations):
        similarity = x @ centroids.T  # (N, k)
        labels = similarity.argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        empty = torch.bincount(labels, minlength=k) == 0
        sums[empty] = x[similarity.amax(1).argsort()[:int(empty.sum())]]
        new = torch.nn.functional.normalize(sums, dim=1)
        if torch.equal(new, centroids):
            break
        centroids = new
    return (x @ centroids.T).argmax(1), centroids


def normalised_entropy(counts):
    """Entropy of a distribution given by counts, divided by the log of its number of bins: in [0, 1]."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / math.log(len(counts))) if len(counts) > 1 else 0.0


def cluster_entropies(labels, domains, tokens, k, min_count=5):
    """(domain entropy of the clusters, cluster entropy of the token types), each averaged over tokens:
    labels, domains, tokens (N,) int."""
    n_domains = int(domains.max()) + 1
    by_cluster = torch.zeros(k, n_domains).index_put_((labels, domains), torch.ones(len(labels)), accumulate=True)
    sizes = by_cluster.sum(1)
    domain_entropy = sum(sizes[c] * normalised_entropy(by_cluster[c]) for c in range(k) if sizes[c]) / sizes.sum()
    types, inverse, counts = tokens.unique(return_inverse=True, return_counts=True)
    by_type = torch.zeros(len(types), k).index_put_((inverse, labels), torch.ones(len(labels)), accumulate=True)
    frequent = counts >= min_count
    token_entropy = sum(counts[t] * normalised_entropy(by_type[t]) for t in frequent.nonzero()[:, 0].tolist())
    return float(domain_entropy), float(token_entropy / counts[frequent].sum().clamp(min=1))


def specialization(model, corpus, n_tokens, k):
    """Both measures of one model on the first n_tokens of each domain's validation text."""
    probs, domain_of, tokens = [], [], []
    for d, domain in enumerate(corpus.domains):
        text = corpus.domain_tokens("val", domain)[:n_tokens]
        probs.append(router_probabilities(model, document_batches(text, model.cfg.seq_len)))
        domain_of.append(torch.full((len(text),), d))
        tokens.append(torch.from_numpy(np.asarray(text, dtype=np.int64)))
    usage = torch.stack([p.mean(0) for p in probs])  # (D, L, Er)
    similarity = domain_similarity(usage)
    features = torch.cat(probs).flatten(1)  # (N, L * Er)
    unit = torch.nn.functional.normalize(pca(features), dim=1)
    labels, _ = spherical_kmeans(unit, k)
    domain_entropy, token_entropy = cluster_entropies(labels, torch.cat(domain_of), torch.cat(tokens), k)
    return {"similarity": similarity, "mean_domain_similarity": mean_off_diagonal(similarity),
            "cluster_domain_entropy": domain_entropy, "token_cluster_entropy": token_entropy,
            "labels": labels, "tokens": torch.cat(tokens)}


def frequent_tokens_of_clusters(labels, tokens, encoding, n_clusters=5, n_tokens=8):
    """Lines naming the most frequent tokens of the largest clusters."""
    lines = []
    for c in torch.bincount(labels).argsort(descending=True)[:n_clusters].tolist():
        types, counts = tokens[labels == c].unique(return_counts=True)
        top = types[counts.argsort(descending=True)[:n_tokens]].tolist()
        lines.append(f"cluster {c} ({int((labels == c).sum())} tokens): "
                     + ", ".join(repr(encoding.decode([t])) if encoding else str(t) for t in top))
    return lines


def plot_similarity(results, domains, path):
    """Heatmaps of domain similarity at the first, middle and last layer, a row per model."""
    plt = pyplot()
    models = list(results)
    n_layer = results[models[0]]["similarity"].shape[0]
    layers = sorted({0, n_layer // 2, n_layer - 1})
    fig, axes = plt.subplots(len(models), len(layers), figsize=(3.6 * len(layers), 3.3 * len(models)), squeeze=False)
    for row, m in enumerate(models):
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            image = ax.imshow(results[m]["similarity"][layer].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{m}, layer {layer}", fontsize=9)
            ax.set_xticks(range(len(domains)), domains, rotation=90, fontsize=7)
            ax.set_yticks(range(len(domains)), domains if col == 0 else [], fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity of mean router probabilities")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", dest="paths", type=checkpoint_paths, required=True,
                        help="checkpoints, comma-separated")
    parser.add_argument("--data_dir", default="data/multidomain")
    parser.add_argument("--tokens", type=int, default=2048, help="validation tokens per domain")
    parser.add_argument("--clusters", type=int, default=32)
    parser.add_argument("--out", default="out/analysis")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    corpus = Corpus(args.data_dir)
    results, lines = {}, []
    for path in args.paths:
        model, ckpt = load_model(path, args.device)
        corpus.check_model(model.cfg.vocab_size, model.cfg.eos_id)
        name = model_name(path)
        results[name] = specialization(model, corpus, args.tokens, args.clusters)
        lines += [f"{name}:"] + frequent_tokens_of_clusters(results[name]["labels"], results[name]["tokens"],
                                                            from_record(ckpt.get("tokenizer")))
    table = ["| model | mean similarity of two domains' routing | its value per layer, first to last | domain "
             "entropy of a cluster | cluster entropy of a token type |", "|---|---|---|---|---|"]
    table += [f"| {m} | {r['mean_domain_similarity']:.3f} | "
              + " / ".join(f"{mean_off_diagonal(layer[None]):.3f}" for layer in r["similarity"])
              + f" | {r['cluster_domain_entropy']:.3f} | {r['token_cluster_entropy']:.3f} |"
              for m, r in results.items()]
    os.makedirs(args.out, exist_ok=True)
    plot_similarity(results, corpus.domains, os.path.join(args.out, "domain_similarity.png"))
    with open(os.path.join(args.out, "specialization.md"), "w") as f:
        f.write("\n".join(table + ["", "Most frequent tokens of the largest clusters:", ""] + lines) + "\n")
    with open(os.path.join(args.out, "specialization.json"), "w") as f:
        json.dump({m: {k: (v.tolist() if k == "similarity" else v) for k, v in r.items()
                       if k not in ("labels", "tokens")} for m, r in results.items()}, f)
    print("\n".join(table + [""] + lines))


if __name__ == "__main__":
    run_command(main)
