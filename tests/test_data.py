"""Corpus tests on a tiny corpus built here (no Debian packages needed): splits, determinism, EOS,
metadata offsets, round trips of the tokenizers, and the BPE trainer's merges.

    python -m pytest tests/test_data.py -q
"""

import json
import os

import numpy as np
import pytest

from data.prepare import build_corpus, split_documents
from data.sources import group_small
from data.tokenizer import count_chunks, load_tokenizer, train_bpe
from errors import UserError
from tests.conftest import tiny_documents


@pytest.fixture
def corpus(tiny_corpus):
    return tiny_corpus


def read_bin(out, name, meta):
    return np.fromfile(os.path.join(out, name), dtype=meta["dtype"])


def test_splits_are_disjoint_and_complete():
    docs = tiny_documents()
    splits = split_documents(docs, max_bytes=10**9, n_val=4, n_calib=3, seed=7)
    texts = {name: {t for _, t in items} for name, items in splits.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["calib"]
    assert not texts["val"] & texts["calib"]
    assert set().union(*texts.values()) == {t for ts in docs.values() for t in ts}
    for domain in docs:
        assert sum(d == domain for d, _ in splits["val"]) == 4
        assert sum(d == domain for d, _ in splits["calib"]) == 3


def test_cap_limits_each_domain():
    docs = tiny_documents()
    splits = split_documents(docs, max_bytes=2000, n_val=2, n_calib=1, seed=7)
    for domain in docs:
        sizes = [len(t.encode()) for items in splits.values() for d, t in items if d == domain]
        assert sum(sizes) - max(sizes) < 2000 <= sum(sizes)  # stops right after crossing the cap


def test_too_few_documents_is_an_error():
    with pytest.raises(UserError, match="fewer than"):
        split_documents({"a": ["x", "y", "z"]}, max_bytes=10**9, n_val=2, n_calib=1, seed=0)


def test_same_seed_same_bytes(corpus, tmp_path):
    out, docs, _ = corpus
    build_corpus(docs, str(tmp_path), tokenizer="bpe", vocab_size=320, n_val=4, n_calib=3, seed=7)
    for name in ("train.bin", "val.bin", "meta.json", "bpe320.tiktoken"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), name


def test_metadata_offsets_point_at_each_document(corpus):
    out, docs, meta = corpus
    enc = load_tokenizer(os.path.join(out, meta["tokenizer_file"]))
    held_out = read_bin(out, "val.bin", meta)
    spans = meta["val_docs"] + meta["calib_docs"]
    assert spans[0][0] == 0 and spans[-1][1] == len(held_out)
    for (start, end, domain), (next_start, _, _) in zip(spans, spans[1:] + [[len(held_out), 0, ""]]):
        assert end == next_start
        assert held_out[end - 1] == meta["eos_id"]
        assert (held_out[start:end - 1] != meta["eos_id"]).all()
        assert enc.decode(held_out[start:end - 1].tolist()) in docs[domain]


def test_train_file_ends_every_document_with_eos(corpus):
    out, docs, meta = corpus
    enc = load_tokenizer(os.path.join(out, meta["tokenizer_file"]))
    train = read_bin(out, "train.bin", meta)
    assert train[-1] == meta["eos_id"]
    ends = np.flatnonzero(train == meta["eos_id"])
    assert len(ends) == sum(meta["train_docs"].values())
    texts = [enc.decode(train[s + 1:e].tolist()) for s, e in zip(np.r_[-1, ends[:-1]], ends)]
    held = {enc.decode(read_bin(out, "val.bin", meta)[s:e - 1].tolist()) for s, e, _ in meta["val_docs"]}
    all_texts = {t for ts in docs.values() for t in ts}
    assert set(texts) <= all_texts and not set(texts) & held
    assert sum(meta["train_tokens"].values()) == len(train)


def test_meta_describes_the_corpus(corpus):
    out, docs, meta = corpus
    saved = json.load(open(os.path.join(out, "meta.json")))
    assert saved == json.loads(json.dumps(meta))
    assert meta["vocab_size"] == 320 and meta["eos_id"] == 319 and meta["dtype"] == "uint16"
    assert meta["domains"] == list(docs)


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_round_trip_every_domain(corpus, name):
    out, docs, meta = corpus
    enc = load_tokenizer(os.path.join(out, meta["tokenizer_file"]) if name == "bpe" else "gpt2")
    for texts in docs.values():
        for text in texts[:5]:
            assert enc.decode(enc.encode_ordinary(text)) == text
    special = "Grüße, 日本語, emoji 🙂, tabs\t\r\n and \\frac{∂f}{∂x}"
    assert enc.decode(enc.encode_ordinary(special)) == special


def test_gpt2_encoding_is_gpt2():
    enc = load_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257


def test_bpe_merges_on_hand_made_text():
    # one chunk "aaabdaaabac": aa (4 times) first; then ab and (aa)a tie at 2 -> smaller ids, ab;
    # then (aa)(ab) = aaab; then all pairs count 1 and (a, c) has the smallest ids
    merges = train_bpe(count_chunks(["aaabdaaabac"]), n_merges=4)
    assert merges == [b"aa", b"ab", b"aaab", b"ac"]


def test_bpe_never_merges_across_chunks():
    merges = train_bpe(count_chunks(["ab ab ab"]), n_merges=10)
    assert all(b" " not in m[1:] for m in merges)  # a space only ever opens a chunk
    assert b"ab" in merges and b" ab" in merges


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(UserError, match="'no-such-tokenizer' is none of gpt2, cl100k_base, dolma2"):
        load_tokenizer("no-such-tokenizer")


def test_group_small_joins_to_target():
    groups = group_small(["a" * 5] * 7, target=10)
    assert groups == ["a" * 10, "a" * 10, "a" * 10, "a" * 5]
