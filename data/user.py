"""
Text of the user's own domain, to prune for it (prune.py --calib PATH) and to evaluate on it (eval.py --data
PATH). PATH is one of
    a text file                  one document
    a folder, or a glob          every file in it (folders recursively, hidden files skipped), one document each
    a .jsonl file                one example per line: {"text": ...} is a document; {"prompt": ..., "answer": ...}
                                 is a task demonstration, whose answer tokens are the ones scored
Files are UTF-8. Examples are tokenized with the checkpoint's tokenizer, each closed by its EOS, and become
(tokens (T,) int64, scored (T,) bool): scored marks the tokens that count, all of a document's, only the
answer's (and its EOS) for a demonstration (the prompt is context).

    examples = read_examples("my_notes/")                                 # [Example]
    tokens = tokenize_examples(examples, encoding, eos_id, vocab_size)    # [(tokens, scored)]
    batches = example_batches(tokens, seq_len, n=16)                      # [(idx (b, T), scored (b, T))]
    batches = document_batches(text_tokens, seq_len)                      # one text, every token scored
    named_paths("notes=my_notes/,code=src/", "--data")                    # {"notes": "my_notes/", ...}
"""

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from errors import UserError


@dataclass
class Example:
    text: str = ""  # a document
    prompt: str = ""  # or a demonstration: prompt then answer
    answer: str = ""
    source: str = ""  # file (and line) it came from, for messages


def matching_files(path):
    """The files PATH names: itself, a folder's files (recursively) or a glob's matches, sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = [os.path.join(root, name) for root, dirs, names in os.walk(path) for name in names
                 if not name.startswith(".") and not any(part.startswith(".") for part in root.split(os.sep)[1:])]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise UserError(f"{path!r} matches no file")
    return sorted(files)


def read_text(file):
    """A file's text; an error names a file that is not UTF-8 (with where) or is empty."""
    raw = open(file, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{file} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}): "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise UserError(f"{file} is empty")
    return text


def read_jsonl(file):
    """Examples of a JSON Lines file: {"text"} documents or {"prompt", "answer"} demonstrations."""
    examples = []
    for n, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{file} line {n} is not JSON ({error.msg})") from None
        where = f"{file} line {n}"
        fields = record if isinstance(record, dict) else {}
        text, prompt, answer = (fields.get(key) for key in ("text", "prompt", "answer"))
        if isinstance(text, str) and text.strip():
            examples.append(Example(text=text, source=where))
        elif isinstance(prompt, str) and isinstance(answer, str) and answer.strip():
            examples.append(Example(prompt=prompt, answer=answer, source=where))
        else:
            raise UserError(f"{where} has no 'text' (nor 'prompt' and 'answer'), or it is empty")
    return examples


def read_examples(path):
    """Every example PATH holds (see the file docstring)."""
    examples = []
    for file in matching_files(path):
        if file.endswith(".jsonl"):
            examples += read_jsonl(file)
        else:
            examples.append(Example(text=read_text(file), source=file))
    if not examples:
        raise UserError(f"{path!r} holds no example")
    return examples


def tokenize_examples(examples, encoding, eos_id, vocab_size=None):
    """[(tokens (T,) int64, scored (T,) bool)], each closed by EOS (which is scored with what it closes).
    With vocab_size (the model's), a token past it means the encoding is not the model's: an error."""
    tokenized = []
    for example in examples:
        if example.text:
            tokens = encoding.encode_ordinary(example.text) + [eos_id]
            scored = [True] * len(tokens)
        else:
            prompt, answer = encoding.encode_ordinary(example.prompt), encoding.encode_ordinary(example.answer)
            tokens = prompt + answer + [eos_id]
            scored = [False] * len(prompt) + [True] * (len(answer) + 1)
        tokenized.append((np.array(tokens, dtype=np.int64), np.array(scored, dtype=bool)))
    largest = max(int(tokens.max()) for tokens, _ in tokenized)
    if vocab_size is not None and largest >= vocab_size:
        raise UserError(f"the tokenizer gives token {largest}, outside the model's vocabulary of {vocab_size}: it is "
                        "not this checkpoint's tokenizer")
    return tokenized


def example_batches(tokenized, seq_len, n, rows=16):
    """Calibration batches of the first n pieces of the examples: [(idx (b, T), scored (b, T))], T <= seq_len. A
    long document is cut into pieces of seq_len; a long demonstration keeps its last seq_len tokens (its
    answer). Consecutive pieces of one length share a batch, up to rows of them: fewer, larger passes."""
    pieces = []
    for tokens, scored in tokenized:
        if scored.all():
            pieces += [(tokens[s:s + seq_len], scored[s:s + seq_len]) for s in range(0, len(tokens), seq_len)]
        else:
            pieces.append((tokens[-seq_len:], scored[-seq_len:]))
    groups = []  # runs of consecutive pieces of one length, at most rows each
    for piece in pieces[:n]:
        if groups and len(groups[-1][0][0]) == len(piece[0]) and len(groups[-1]) < rows:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return [(torch.from_numpy(np.stack([t for t, _ in group])), torch.from_numpy(np.stack([m for _, m in group])))
            for group in groups]


def document_batches(tokens, seq_len):
    """Text (n,) cut into windows of seq_len (the last shorter), 16 windows a batch, every token scored:
    [(idx (b, T), scored (b, T))] (example_batches of one document)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return example_batches([(tokens, np.ones(len(tokens), dtype=bool))], seq_len, n=len(tokens))


def user_batches(path, encoding, cfg, n):
    """--calib PATH: the first n pieces of the user's text as batches (example_batches), tokenized with encoding
    for a model of config cfg."""
    tokenized = tokenize_examples(read_examples(path), encoding, cfg.eos_id, cfg.vocab_size)
    return example_batches(tokenized, cfg.seq_len, n)


def evaluation_text(path, encoding, cfg):
    """eval.py --data PATH: (tokens (n,), scored (n,), documents [token arrays]), the examples back to back."""
    tokenized = tokenize_examples(read_examples(path), encoding, cfg.eos_id, cfg.vocab_size)
    documents = [tokens for tokens, scored in tokenized if scored.all()]
    return np.concatenate([t for t, _ in tokenized]), np.concatenate([s for _, s in tokenized]), documents


def named_paths(spec, flag):
    """'name=path,name2=path2' (or one bare path, named by its file or folder) -> {name: path}."""
    named = {}
    for part in spec.split(","):
        name, _, path = part.rpartition("=")
        named[name or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]] = path
    if not all(named):
        raise UserError(f"{flag} {spec!r}: give NAME=PATH pairs")
    return named
