"""
Tokenizers for nanoEMO, all served by tiktoken and all usable offline:
- 'bpe4k' style: a small byte-level BPE trained here on the corpus (train_bpe below), saved as a tiktoken
  rank file. The CPU demo needs a small vocabulary: the LM head dominates a tiny model's time.
- 'gpt2': GPT-2's 50257-token encoding from the rank file vendored in data/tokenizers/ (MIT, from the
  openai-whisper package; see data/tokenizers/LICENSE-gpt2), for GPU runs.
- 'cl100k_base': fetched by tiktoken itself, so it needs a network once (or tiktoken's cache).
- 'dolma2': the release's tokenizer, cl100k_base's ranks with its special tokens plus <|pad|> (EOS 100257,
  PAD 100277); the model pads the vocabulary to 100352.
- a Hugging Face tokenizer.json of a byte-level BPE (GPT-2's, cl100k's, the release's dolma2): its vocabulary
  becomes tiktoken's ranks, its pre-tokenizer regex tiktoken's pattern, its special tokens tiktoken's; read
  offline (read_tokenizer_json), and written for exports (tokenizer_json).
Checkpoints carry their tokenizer (tokenizer_record / encoding_from_record): a name for the ones nanoEMO can
always rebuild, the ranks themselves otherwise.

The trainer is the textbook algorithm, made fast enough for a few MB of text: split the text into chunks
with the pre-tokenizer regex, count identical chunks once, then repeatedly merge the most frequent adjacent
pair, updating only the chunks that contain it (a heap holds the pair counts).

    enc = load_tokenizer("data/multidomain/bpe4k.tiktoken")   # or "gpt2", "cl100k_base"
    ids = enc.encode_ordinary(text); text == enc.decode(ids)
    enc = read_tokenizer_json("path/to/Emo_1b14b_1T/tokenizer.json")
"""

import base64
import heapq
import json
import os
from collections import Counter, defaultdict

import regex
import tiktoken

from errors import UserError

# cl100k_base's pre-tokenizer: letters, 1-3 digit numbers, punctuation runs and whitespace become chunks;
# BPE never merges across chunks.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_TOKEN = "<|endoftext|>"
VENDORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers")


def count_chunks(texts):
    """How often each pre-tokenized chunk occurs: {chunk bytes: count}."""
    counts = Counter()
    pattern = regex.compile(SPLIT_PATTERN)
    for text in texts:
        counts.update(chunk.encode("utf-8") for chunk in pattern.findall(text))
    return counts


def word_pairs(word):
    return list(zip(word, word[1:]))


def train_bpe(chunk_counts, n_merges):
    """Byte-level BPE: returns the merged tokens in rank order (bytes), after the 256 single bytes.
    Each step merges the most frequent adjacent pair; ties go to the smallest pair of token ids."""
    token_bytes = [bytes([b]) for b in range(256)]
    words = [list(chunk) for chunk in chunk_counts]  # each chunk as a list of token ids
    freqs = list(chunk_counts.values())
    pair_counts = Counter()
    pair_words = defaultdict(set)  # pair -> words that contain it (may hold stale entries)
    for w, word in enumerate(words):
        for pair in word_pairs(word):
            pair_counts[pair] += freqs[w]
            pair_words[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merged = []
    while len(merged) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:  # stale heap entry, the count has changed since
            continue
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merged.append(token_bytes[-1])
        changed = set()
        for w in pair_words.pop(pair):
            word = words[w]
            for old in word_pairs(word):
                pair_counts[old] -= freqs[w]
                changed.add(old)
            words[w] = word = merge_pair(word, pair, new_id)
            for new in word_pairs(word):
                pair_counts[new] += freqs[w]
                pair_words[new].add(w)
                changed.add(new)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return merged


def merge_pair(word, pair, new_id):
    """Replace every occurrence of pair in word (left to right, no overlaps) by new_id."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def save_ranks(path, merged):
    """Write a tiktoken rank file: one 'base64(token) rank' line per token, single bytes first."""
    tokens = [bytes([b]) for b in range(256)] + merged
    with open(path, "w") as f:
        for rank, token in enumerate(tokens):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def read_ranks(path):
    with open(path) as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def encoding_from_file(path, pattern):
    """A tiktoken Encoding from a rank file; the EOS token takes the id after the last rank."""
    ranks = read_ranks(path)
    name = os.path.splitext(os.path.basename(path))[0]
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: len(ranks)})


def cl100k_base():
    try:
        return tiktoken.get_encoding("cl100k_base")
    except Exception as error:  # tiktoken downloads its rank file on first use
        raise UserError(f"cl100k_base could not be loaded ({error}); tiktoken fetches it from the network on "
                        "first use (then caches it, see TIKTOKEN_CACHE_DIR): run once with a network, or use "
                        "--tokenizer bpe / gpt2") from error


def load_tokenizer(name):
    """'gpt2', 'cl100k_base', 'dolma2' (both need cl100k_base's rank file: a network once, or tiktoken's
    cache) or the path of a rank file trained here."""
    if name == "gpt2":
        return encoding_from_file(os.path.join(VENDORED, "gpt2.tiktoken"), GPT2_PATTERN)
    if name == "cl100k_base":
        return cl100k_base()
    if name == "dolma2":
        base = cl100k_base()
        return tiktoken.Encoding("dolma2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={**base._special_tokens, "<|pad|>": 100277})
    if not os.path.exists(name):
        raise UserError(f"tokenizer {name!r} is neither 'gpt2', 'cl100k_base' nor an existing rank file")
    return encoding_from_file(name, SPLIT_PATTERN)


NAMED = ("gpt2", "cl100k_base", "dolma2")  # encodings load_tokenizer rebuilds by name


def ranks_text(encoding):
    """An encoding's ranks as the text of a tiktoken rank file."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1]))


def tokenizer_record(encoding, name):
    """What a checkpoint stores of its tokenizer: the name of a named encoding, else the ranks themselves
    (a BPE of 4096 tokens is ~40 KB), the pattern and the special tokens."""
    if name in NAMED:
        return {"name": name}
    return {"name": name, "pattern": encoding._pat_str, "ranks": ranks_text(encoding),
            "special_tokens": dict(encoding._special_tokens)}


def encoding_for(spec):
    """The encoding a user names: gpt2, cl100k_base, dolma2, a rank file, or a Hugging Face tokenizer.json."""
    return read_tokenizer_json(spec) if spec.endswith(".json") else load_tokenizer(spec)


def record_for(spec):
    """The checkpoint record of the encoding a user names (see encoding_for)."""
    return {"name": spec} if spec in NAMED else tokenizer_record(encoding_for(spec), os.path.basename(spec))


def encoding_from_record(record):
    """The tiktoken Encoding a checkpoint's tokenizer record describes."""
    if "ranks" not in record:
        return load_tokenizer(record["name"])
    ranks = {base64.b64decode(token): int(rank) for token, rank in
             (line.split() for line in record["ranks"].splitlines() if line.strip())}
    return tiktoken.Encoding(record["name"], pat_str=record["pattern"], mergeable_ranks=ranks,
                             special_tokens=record["special_tokens"])


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
    """A Hugging Face tokenizer.json dict for a tiktoken encoding (byte-level BPE, its pattern as a Split)."""
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
