"""
Hugging Face tokenizer.json files of byte-level BPE tokenizers (GPT-2's, cl100k's, the release's dolma2), read
into tiktoken and written from it, offline: the vocabulary becomes tiktoken's ranks, the pre-tokenizer regex
tiktoken's pattern, the added tokens tiktoken's special tokens. Reading checks what makes tiktoken's
rank-based BPE equal to the merge-based BPE of the tokenizers library; writing derives each token's merge
from the ranks.

    encoding = read_tokenizer_json("path/to/Emo_1b14b_1T/tokenizer.json")
    write_tokenizer_json(encoding, "out/emo_tiny_hf/tokenizer.json")
"""

import json
import os

import tiktoken

from errors import UserError

# GPT-2's pre-tokenizer, the one a plain ByteLevel pre-tokenizer means
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode():
    """GPT-2's byte-level alphabet: every byte as a printable character, as tokenizer.json writes tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def split_pattern(pre_tokenizer, path):
    """The pre-tokenizer regex of a tokenizer.json: GPT-2's for a plain ByteLevel pre-tokenizer, or the Split
    regex before a ByteLevel one (cl100k, dolma2)."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and not steps[1].get("use_regex", True):
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: unsupported pre-tokenizer {kinds or None} (nanoEMO reads byte-level BPE "
                    "tokenizers: a ByteLevel pre-tokenizer, or Split(regex) then ByteLevel)")


def merges_in_rank_order(model, path):
    """Check what makes rank-based BPE (tiktoken) equal merge-based BPE (tokenizers): each merge makes a token
    of a higher rank than the merges before it."""
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    previous = -1
    for left, right in merges:
        rank = model["vocab"].get(left + right)
        if rank is None or rank <= previous:
            raise UserError(f"{path}: merge ({left!r}, {right!r}) does not make the next token in rank order; "
                            "nanoEMO needs token ids ordered as the merges (as GPT-2, cl100k and dolma2 are)")
        previous = rank


def read_tokenizer_json(path):
    """A tiktoken Encoding from a Hugging Face tokenizer.json of a byte-level BPE, or an error that says why not."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable tokenizer.json ({error})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: model type {model.get('type')!r} is not a byte-level BPE")
    if spec.get("normalizer"):
        raise UserError(f"{path}: a normalizer ({spec['normalizer'].get('type')}) is not supported")
    pattern = split_pattern(spec.get("pre_tokenizer"), path)
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    try:
        ranks = {bytes(to_byte[c] for c in token): rank for token, rank in model["vocab"].items() if token not in added}
    except KeyError as error:
        raise UserError(f"{path}: vocabulary token with character {error} outside the byte-level alphabet") from None
    merges_in_rank_order(model, path)
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "tokenizer"
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)


def merge_of(token, ranks):
    """The two tokens BPE merges last to make token: byte-level BPE on token's bytes with the ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], limit) for i in range(len(parts) - 1)]
        i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_json(encoding):
    """The tokenizer.json dict of a tiktoken encoding (byte-level BPE, its pattern as a Split)."""
    to_char = byte_to_unicode()
    ranks = encoding._mergeable_ranks

    def text(token):
        return "".join(to_char[b] for b in token)

    in_rank_order = sorted(ranks, key=ranks.__getitem__)
    vocab = {text(token): ranks[token] for token in in_rank_order}
    merges = [" ".join(text(part) for part in merge_of(token, ranks)) for token in in_rank_order if len(token) > 1]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(encoding._special_tokens.items(), key=lambda item: item[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": encoding._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def write_tokenizer_json(encoding, path):
    """Write encoding as a Hugging Face tokenizer.json at path."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(encoding), f, ensure_ascii=False)
