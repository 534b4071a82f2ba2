"""Your own domain, offline: text files of a new domain, pruning for them, evaluating on held-out files,
exporting to the Hugging Face format, reloading and sampling; the tokenizer that travels with a checkpoint
(tokenizer.json read and written); reading user text and its errors.

    python -m pytest tests/test_user_path.py -q
"""

import json
import random

import pytest
import torch

import eval as evaluation
import prune
import sample
from checkpoint import load_model, model_name
from data.tokenizer import from_record, load_tokenizer
from data.tokenizer_json import read_tokenizer_json, tokenizer_json
from data.user import example_batches, read_examples, tokenize_examples
from errors import UserError, run_command
from experiments import sweep
from tests.test_cli import one_line_error

RECIPE_WORDS = ["flour", "butter", "sugar", "whisk", "oven", "bake", "minutes", "stir", "salt", "eggs", "until",
                "golden", "the", "and", "add", "cup", "of", "a", "pinch", "knead"]


def write_recipes(folder, n, seed):
    """n text files of a domain the tiny corpus does not have."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n):
        words = " ".join(rng.choice(RECIPE_WORDS) for _ in range(rng.randint(60, 120)))
        (folder / f"recipe{i}.txt").write_text(f"Recipe {i}: {words}.\n", encoding="utf-8")
    return str(folder)


def test_the_whole_user_path(tiny_checkpoints, tmp_path, capsys):
    calib, held_out = write_recipes(tmp_path / "calib", 4, 0), write_recipes(tmp_path / "eval", 5, 1)
    pruned = tmp_path / "recipes"
    prune.main(["--ckpt", tiny_checkpoints["emo"], "--calib", calib, "--domain", "recipes", "--keep", "0.5",
                "--out", str(pruned), "--hf_out", str(tmp_path / "recipes_hf")])
    model, ckpt = load_model(str(pruned) + ".pt")
    assert model.cfg.n_experts == 4 and ckpt["pruning"]["domain"] == "recipes" and ckpt["tokenizer"]
    # evaluate on the held-out files with the checkpoint's own tokenizer
    evaluation.main(["--ckpt", str(pruned) + ".pt", "--data", f"recipes={held_out}"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["recipes"])  # the domain's row
    loss, tokens = float(row.split()[1]), int(row.split()[-1])
    encoding = from_record(ckpt["tokenizer"])
    expected_tokens = sum(len(encoding.encode_ordinary(t.text)) + 1 for t in read_examples(held_out)) - 1
    assert tokens == expected_tokens and 0 < loss < 20
    # the Hugging Face export carries the tokenizer and the pruning record; it reloads to the same model
    hf = tmp_path / "recipes_hf"
    record = json.loads((hf / "pruning.json").read_text())
    assert record["domain"] == "recipes" and [len(k) for k in record["experts_kept_per_layer"]] == [4, 4]
    assert all(k[-1] == 7 for k in record["experts_kept_per_layer"])  # the shared expert, original id
    release = json.loads((hf / "pruning_metadata.json").read_text())  # the release's own record of a pruning
    assert release["experts_kept_per_layer"] == record["experts_kept_per_layer"] and release["prune_keep_k"] == 4
    assert release["num_shared_experts"] == 1 and release["original_model"] == tiny_checkpoints["emo"]
    reloaded, reloaded_ckpt = load_model(str(hf))
    idx = torch.tensor([encoding.encode_ordinary("Recipe 9: whisk the eggs")])
    torch.testing.assert_close(reloaded.float()(idx), model(idx), rtol=3e-2, atol=3e-2)  # bf16 export
    assert from_record(reloaded_ckpt["tokenizer"]).encode_ordinary("bake until golden") == \
        encoding.encode_ordinary("bake until golden")
    # and it samples, greedily the same as the .pt
    for path in (str(hf), str(pruned) + ".pt"):
        sample.main(["--ckpt", path, "--prompt", "Recipe 9: whisk", "--max_new_tokens", "8", "--temperature", "0"])
    texts = [part.strip() for part in capsys.readouterr().out.split("-" * 40)[:-1]]
    assert texts[0].startswith("Recipe 9: whisk") and len(texts[0]) > len("Recipe 9: whisk")


def test_a_sweep_over_a_user_domain(tiny_checkpoints, tmp_path):
    calib, held_out = write_recipes(tmp_path / "calib", 4, 2), write_recipes(tmp_path / "eval", 6, 3)
    sweep.main(["--ckpt", f"{tiny_checkpoints['emo']},{tiny_checkpoints['std']}", "--calib", f"recipes={calib}",
                "--data", f"recipes={held_out}", "--keep", "1.0,0.5", "--out", str(tmp_path / "sweep"),
                "--method", "global"])
    rows = json.load(open(tmp_path / "sweep" / "results.json"))
    models = [model_name(tiny_checkpoints[router]) for router in ("emo", "std")]
    assert {(r["model"], r["domain"], r["keep"]) for r in rows} == {(m, "recipes", k) for m in models for k in (8, 4)}
    assert all(r["task_items"] == 12 for r in rows)  # two items per held-out document


def test_prompt_answer_examples_score_the_answer(tmp_path):
    encoding = load_tokenizer("gpt2")
    (tmp_path / "short.jsonl").write_text('{"prompt": "2 + 2 =", "answer": " 4"}\n')
    (tokens, scored), = tokenize_examples(read_examples(str(tmp_path / "short.jsonl")), encoding, 50256)
    assert tokens.tolist() == encoding.encode_ordinary("2 + 2 =") + encoding.encode_ordinary(" 4") + [50256]
    assert scored.tolist() == [False] * len(encoding.encode_ordinary("2 + 2 =")) + [True, True]
    # a long demonstration keeps its end (the answer) in the model's window
    (tmp_path / "long.jsonl").write_text('{"prompt": "' + "word " * 50 + '", "answer": " yes"}\n')
    long = tokenize_examples(read_examples(str(tmp_path / "long.jsonl")), encoding, 50256)
    (idx, mask), = example_batches(long, 16, n=4)
    assert idx.shape == (1, 16) and mask[0, -2:].all() and not mask[0, :-2].any()


def test_calibration_pieces_of_one_length_share_a_batch():
    """Documents cut into pieces of seq_len; consecutive pieces of one length stacked, rows at a time."""
    import numpy as np
    documents = [(np.arange(64), np.ones(64, dtype=bool)), (np.arange(40), np.ones(40, dtype=bool)),
                 (np.arange(20), np.ones(20, dtype=bool)), (np.arange(20), np.ones(20, dtype=bool))]
    batches = example_batches(documents, 32, n=6, rows=2)  # pieces 32 32 | 32 8 | 20 20
    assert [tuple(idx.shape) for idx, _ in batches] == [(2, 32), (1, 32), (1, 8), (2, 20)]
    assert batches[0][0][1].tolist() == list(range(32, 64)) and batches[1][0][0].tolist() == list(range(32))
    assert [tuple(idx.shape) for idx, _ in example_batches(documents, 32, n=3, rows=2)] == [(2, 32), (1, 32)]


def test_folders_are_read_recursively_without_hidden_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first")
    (tmp_path / "a" / "b" / "two.md").write_text("second")
    (tmp_path / "a" / ".hidden").write_text("never")
    assert [e.text for e in read_examples(str(tmp_path / "a"))] == ["second", "first"]  # sorted by path: b/ < one
    assert [e.text for e in read_examples(str(tmp_path / "a" / "*.txt"))] == ["first"]


MULTILINGUAL_CODE = ("def naïve_sum(xs: list[int]) -> int:\n    return sum(x ** 2 for x in xs)  # ∑ x²\n\n"
                     "Größere Häuser über dem Fluß; 日本語のテキスト、中文字符。 Привет, мир! 🎉🎉 "
                     "if (a != b && c <= 0x1F) { return -1; }\t\t\n    \n1234567 3.14159 'quoted' \"double\"")


def test_a_tokenizer_json_from_gpt2_encodes_as_gpt2(tmp_path):
    gpt2 = load_tokenizer("gpt2")
    spec = tokenizer_json(gpt2)
    assert spec["model"]["merges"][:3] == ["Ġ t", "Ġ a", "h e"] and spec["model"]["vocab"]["Ġthe"] == 262  # GPT-2's
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    read = read_tokenizer_json(str(tmp_path / "tokenizer.json"))
    assert read.encode_ordinary(MULTILINGUAL_CODE) == gpt2.encode_ordinary(MULTILINGUAL_CODE)
    assert read.encode_ordinary("Hello world") == [15496, 995]
    assert read.encode("<|endoftext|>", allowed_special="all") == [50256]
    # GPT-2's own form: a ByteLevel pre-tokenizer with its built-in regex
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "bytelevel.json").write_text(json.dumps(spec))
    assert read_tokenizer_json(str(tmp_path / "bytelevel.json")).encode_ordinary(MULTILINGUAL_CODE) == \
        gpt2.encode_ordinary(MULTILINGUAL_CODE)


@pytest.mark.parametrize("change,message", [
    (lambda s: "not json", "is not a readable tokenizer.json"),
    (lambda s: {**s, "model": {**s["model"], "type": "WordPiece"}}, "model type 'WordPiece' is not a byte-level BPE"),
    (lambda s: {**s, "normalizer": {"type": "NFC"}}, "a normalizer \\(NFC\\) is not supported"),
    (lambda s: {**s, "pre_tokenizer": {"type": "Whitespace"}}, "unsupported pre-tokenizer \\['Whitespace'\\]"),
    (lambda s: {**s, "model": {**s["model"], "merges": s["model"]["merges"][1::-1]}}, "does not make the next token"),
])
def test_malformed_or_unsupported_tokenizer_json_is_named(tmp_path, change, message):
    spec = tokenizer_json(load_tokenizer("gpt2"))
    changed = change(spec)
    (tmp_path / "tokenizer.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(UserError, match=message):
        read_tokenizer_json(str(tmp_path / "tokenizer.json"))


def test_bad_user_input_is_one_line(tiny_checkpoints, tmp_path, capsys):
    base = ["--ckpt", tiny_checkpoints["emo"], "--keep", "0.5", "--out", str(tmp_path / "p")]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("Größe".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    assert one_line_error(capsys, prune.main, [*base, "--calib", str(tmp_path / "empty.txt")]) == (
        f"error: {tmp_path / 'empty.txt'} is empty")
    assert one_line_error(capsys, prune.main, [*base, "--calib", str(tmp_path / "latin1.txt")]) == (
        f"error: {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 0xf6 at offset 2): convert it first, "
        "e.g. iconv -f latin1 -t utf-8")
    assert one_line_error(capsys, prune.main, [*base, "--calib", str(tmp_path / "bad.jsonl")]) == (
        f"error: {tmp_path / 'bad.jsonl'} line 2 has no 'text' (nor 'prompt' and 'answer'), or it is empty")
    assert one_line_error(capsys, prune.main, [*base, "--calib", str(tmp_path / "nothing*.txt")]) == (
        f"error: '{tmp_path / 'nothing*.txt'}' matches no file")
    assert one_line_error(capsys, evaluation.main, ["--ckpt", tiny_checkpoints["emo"], "--data",
                                                    str(tmp_path / "none")]) == (
        f"error: '{tmp_path / 'none'}' matches no file")


def test_a_checkpoint_without_tokenizer_needs_one_given(tiny_checkpoints, tmp_path, capsys):
    ckpt = torch.load(f"{tiny_checkpoints['emo']}/ckpt.pt", weights_only=False)
    del ckpt["tokenizer"]
    torch.save(ckpt, tmp_path / "bare.pt")
    write_recipes(tmp_path / "calib", 2, 4)
    assert one_line_error(capsys, prune.main, ["--ckpt", str(tmp_path / "bare.pt"), "--calib", str(tmp_path / "calib"),
                                               "--keep", "0.5", "--out", str(tmp_path / "p")]) == (
        f"error: {tmp_path / 'bare.pt'} records no tokenizer: give --tokenizer (gpt2, cl100k_base, dolma2, a rank "
        "file or a tokenizer.json)")
    # a tokenizer that does not fit the model is refused too
    assert one_line_error(capsys, prune.main, ["--ckpt", str(tmp_path / "bare.pt"), "--calib", str(tmp_path / "calib"),
                                               "--keep", "0.5", "--tokenizer", "gpt2"]).startswith(
        "error: the tokenizer gives token")


def test_training_records_the_tokenizer(tiny_checkpoints, tiny_corpus):
    ckpt = torch.load(f"{tiny_checkpoints['std']}/ckpt.pt", weights_only=False)
    encoding = from_record(ckpt["tokenizer"])
    corpus_encoding = load_tokenizer(f"{tiny_corpus[0]}/{tiny_corpus[2]['tokenizer_file']}")
    text = "code 3: def return x += None"
    assert encoding.encode_ordinary(text) == corpus_encoding.encode_ordinary(text)
    assert encoding.eot_token == 319 and ckpt["tokenizer"]["ranks"]  # a BPE trained here travels as its ranks


def test_run_command_exit_code_for_sample(capsys, tiny_checkpoints):
    with pytest.raises(SystemExit) as exit_info:
        run_command(sample.main, ["--ckpt", tiny_checkpoints["emo"], "--max_new_tokens", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --max_new_tokens, --num_samples and --top_k must be at least 1\n"
