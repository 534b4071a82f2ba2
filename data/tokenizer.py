"""
Tokenizers for nanoEMO, all served by tiktoken and all usable offline:
- a small byte-level BPE trained here on the corpus (train_bpe below), saved as a tiktoken rank file
  (data/prepare.py writes bpe4096.tiktoken). The CPU demo needs a small vocabulary: the LM head dominates a
  tiny model's time.
- 'gpt2': GPT-2's 50257-token encoding from the rank file vendored in data/tokenizers/ (MIT, from the
  openai-whisper package; see data/tokenizers/LICENSE-gpt2), for GPU runs.
- 'cl100k_base': fetched by tiktoken itself, so it needs a network once (or tiktoken's cache).
- 'dolma2': the release's tokenizer, cl100k_base's ranks with its special tokens plus <|pad|> (EOS 100257,
  PAD 100277); the model pads the vocabulary to 100352.
- a Hugging Face tokenizer.json of a byte-level BPE (data/tokenizer_json.py).
Checkpoints carry their tokenizer as a record (tokenizer_record / from_record): a name for the ones nanoEMO
can always rebuild, the ranks themselves otherwise.

The trainer is the textbook algorithm, made fast enough for a few MB of text: split the text into chunks
with the pre-tokenizer regex, count identical chunks once, then repeatedly merge the most frequent adjacent
pair, updating only the chunks that contain it (a heap holds the pair counts).

    enc = load_tokenizer("data/multidomain/bpe4096.tiktoken")   # or "gpt2", "dolma2", a tokenizer.json
    ids = enc.encode_ordinary(text); text == enc.decode(ids)
    record = tokenizer_record("gpt2"); enc = from_record(record)
"""

import base64
import heapq
import os
from collections import Counter, defaultdict

import regex
import tiktoken

from data.tokenizer_json import GPT2_PATTERN, read_tokenizer_json
from errors import UserError

# cl100k_base's pre-tokenizer: letters, 1-3 digit numbers, punctuation runs and whitespace become chunks;
# BPE never merges across chunks.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
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


def ranks_text(ranks):
    """The text of a tiktoken rank file: one 'base64(token) rank' line per token, in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def parse_ranks(text):
    """{token bytes: rank} from the text of a rank file."""
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines()
                                                                     if line.strip())}


def save_ranks(path, merged):
    """Write the rank file of a BPE trained here: the 256 single bytes, then the merged tokens."""
    tokens = [bytes([b]) for b in range(256)] + merged
    with open(path, "w") as f:
        f.write(ranks_text({token: rank for rank, token in enumerate(tokens)}))


def encoding_from_file(path, pattern):
    """A tiktoken Encoding from a rank file; the EOS token takes the id after the last rank."""
    with open(path) as f:
        ranks = parse_ranks(f.read())
    name = os.path.splitext(os.path.basename(path))[0]
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: len(ranks)})


def cl100k_base():
    try:
        return tiktoken.get_encoding("cl100k_base")
    except Exception as error:  # tiktoken downloads its rank file on first use
        raise UserError(f"cl100k_base could not be loaded ({error}); tiktoken fetches it from the network on "
                        "first use (then caches it, see TIKTOKEN_CACHE_DIR): run once with a network, or use "
                        "gpt2 (or a corpus of python -m data.prepare --tokenizer bpe)") from error


NAMED = ("gpt2", "cl100k_base", "dolma2")  # encodings load_tokenizer builds by name


def load_tokenizer(spec):
    """The encoding spec names: 'gpt2', 'cl100k_base', 'dolma2' (both need cl100k_base's rank file: a network
    once, or tiktoken's cache), the path of a rank file trained here, or a Hugging Face tokenizer.json."""
    if spec == "gpt2":
        return encoding_from_file(os.path.join(VENDORED, "gpt2.tiktoken"), GPT2_PATTERN)
    if spec == "cl100k_base":
        return cl100k_base()
    if spec == "dolma2":
        base = cl100k_base()
        return tiktoken.Encoding("dolma2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={**base._special_tokens, "<|pad|>": 100277})
    if not os.path.exists(spec):
        raise UserError(f"tokenizer {spec!r} is none of {', '.join(NAMED)}, nor an existing rank file or "
                        "tokenizer.json")
    if spec.endswith(".json"):
        return read_tokenizer_json(spec)
    return encoding_from_file(spec, SPLIT_PATTERN)


def tokenizer_record(spec):
    """What a checkpoint stores of the tokenizer spec names: the name of a named encoding (rebuilt by name,
    nothing loaded here), else the ranks themselves (a BPE of 4096 tokens is ~40 KB), the pattern and the
    special tokens."""
    if spec in NAMED:
        return {"name": spec}
    encoding = load_tokenizer(spec)
    return {"name": os.path.basename(spec), "pattern": encoding._pat_str,
            "ranks": ranks_text(encoding._mergeable_ranks), "special_tokens": dict(encoding._special_tokens)}


def from_record(record):
    """The tiktoken Encoding a checkpoint's tokenizer record describes (None for none)."""
    if record is None:
        return None
    if "ranks" not in record:
        return load_tokenizer(record["name"])
    return tiktoken.Encoding(record["name"], pat_str=record["pattern"], mergeable_ranks=parse_ranks(record["ranks"]),
                             special_tokens=record["special_tokens"])
