"""
Tokenizers for nanoEMO, all served by tiktoken and all usable offline:
- 'bpe4k' style: a small byte-level BPE trained here on the corpus (train_bpe below), saved as a tiktoken
  rank file. The CPU demo needs a small vocabulary: the LM head dominates a tiny model's time.
- 'gpt2': GPT-2's 50257-token encoding from the rank file vendored in data/tokenizers/ (MIT, from the
  openai-whisper package; see data/tokenizers/LICENSE-gpt2), for GPU runs.
- 'cl100k_base': fetched by tiktoken itself, so it needs a network once (or tiktoken's cache).
- 'dolma2': the release's tokenizer, cl100k_base's ranks with its special tokens plus <|pad|> (EOS 100257,
  PAD 100277); the model pads the vocabulary to 100352.

The trainer is the textbook algorithm, made fast enough for a few MB of text: split the text into chunks
with the pre-tokenizer regex, count identical chunks once, then repeatedly merge the most frequent adjacent
pair, updating only the chunks that contain it (a heap holds the pair counts).

    enc = load_tokenizer("data/multidomain/bpe4k.tiktoken")   # or "gpt2", "cl100k_base"
    ids = enc.encode_ordinary(text); text == enc.decode(ids)
"""

import base64
import heapq
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
