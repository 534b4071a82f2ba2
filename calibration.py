"""
Which text pruning and fine-tuning see: the calibration examples that choose a domain's experts (prune.py,
prune_stream.py) and the examples a pruned model is fine-tuned on (finetune.py), from one of three sources:

    --domain NAME       a domain of the built-in corpus (--data_dir): task demonstrations made from its
                        calibration documents (tasks.py: a passage and its true continuation, the
                        continuation's tokens scored)
    --calib PATH        your own text (data/user.py): a file, folder, glob or JSON Lines; every token of a
                        document, the answer's tokens of a prompt/answer demonstration
    --benchmark NAME    a benchmark's validation questions (benchmarks.py), each its 5-shot context and gold
                        answer, every token scored, as the release calibrates

Each builder stays beside its data (tasks.py, data/user.py, benchmarks.py); this file decides which one a
command uses and with which tokenizer. The experiments (experiments/paper.py) calibrate on the release's kind
of example for a built-in domain: a few-shot prompt then a gold continuation (few_shot_calibration).

    text_arguments(parser, "calibration", benchmark=True)      # --domain, --calib, --benchmark, ...
    name, description = text_source(args)
    batches = argument_texts(args, ckpt.get("tokenizer"), model.cfg, ["python"], n=16)  # one list per domain
"""

import os

from benchmarks import PROTOCOLS, parse_benchmarks, question_batches
from checkpoint import checkpoint_tokenizer
from data.corpus import Corpus
from data.user import user_batches
from errors import UserError
from tasks import demonstrations, few_shot_examples

CALIBRATION_SEED = 1  # which passages of the calibration documents pruning calibrates on
POOL_SEED = 2  # the fine-tuning pool's passages: others than pruning's
SHOTS = 2  # demonstrations before the gold one in the experiments' calibration examples


def corpus_calibration(corpus, domain, n, seed=CALIBRATION_SEED):
    """n task demonstrations of a built-in domain in one batch: [(idx (n, T), answer mask (n, T))]."""
    return [demonstrations(corpus.documents("calib", domain), n, seed)]


def few_shot_calibration(corpus, domain, n, seed=CALIBRATION_SEED, shots=SHOTS, shuffle_documents=False,
                         answers_only=False):
    """n calibration examples of the release's kind for a built-in domain (shots demonstrations then a passage
    and its gold continuation, every token scored, or with answers_only the continuation's: the release
    fine-tunes on its selection examples with that loss), in one batch; with shuffle_documents the seed draws
    the documents too."""
    return [few_shot_examples(corpus.documents("calib", domain), n, shots, seed, shuffle_documents, answers_only)]


def domain_pool(corpus, domain, n):
    """A built-in domain's fine-tuning pool: n demonstrations from its calibration documents, in one batch."""
    return corpus_calibration(corpus, domain, n, POOL_SEED)


def text_arguments(parser, purpose, domain_help="a domain of the built-in corpus, or the name of --calib's",
                   benchmark=False):
    """Where the text of a command that calibrates or fine-tunes comes from: --domain of the built-in corpus in
    --data_dir, or your own --calib text, tokenized with --tokenizer when the checkpoint records none; with
    benchmark, also a benchmark's questions (--benchmark)."""
    parser.add_argument("--domain", default="", help=domain_help)
    parser.add_argument("--calib", default="", help=f"your own {purpose} text: file, folder, glob or .jsonl")
    if benchmark:
        parser.add_argument("--benchmark", default="", help="a benchmark (benchmarks.py): its calibration "
                            "questions, each with its 5-shot context and gold answer")
        parser.add_argument("--protocol", default="nanoemo", choices=PROTOCOLS, help="--benchmark: which of its "
                            "questions may calibrate (benchmarks.py): nanoemo's, the EMO paper's or OLMES's")
    parser.add_argument("--tokenizer", default="", help=f"for --calib{' or --benchmark' if benchmark else ''} when "
                        "the checkpoint records none: gpt2, cl100k_base, dolma2, a rank file or a tokenizer.json")
    parser.add_argument("--data_dir", default="data/multidomain", help="the built-in corpus")


def text_source(args):
    """(name, description) of the one text text_arguments point to; an error where none is given or two are."""
    benchmark = getattr(args, "benchmark", "")
    if benchmark:
        if args.calib or args.domain:
            raise UserError("--benchmark is the calibration text and its name: give no --calib or --domain with it")
        parse_benchmarks(benchmark)
        if "," in benchmark:
            raise UserError(f"--benchmark {benchmark}: one benchmark at a time")
        return benchmark, f"benchmark {benchmark}: validation questions, 5-shot context and gold answer"
    if not args.domain and not args.calib:
        raise UserError("give --domain (a domain of the built-in corpus), --calib PATH (your own text)"
                        f"{' or --benchmark NAME' if hasattr(args, 'benchmark') else ''}")
    name = args.domain.replace(",", "+") or os.path.splitext(os.path.basename(os.path.normpath(args.calib)))[0]
    return name, args.calib or f"{args.data_dir} calibration documents"


def text_split(args):
    """Which split the text comes from, for the pruning record: a benchmark's validation questions, the corpus's
    calibration documents, or the user's own text."""
    if getattr(args, "benchmark", ""):
        return "train" if args.protocol == "emo" and args.benchmark.startswith("mmlu") else "validation"
    return "user" if args.calib else "calib"


def argument_texts(args, tokenizer, cfg, domains, n, seed=CALIBRATION_SEED, answers_only=False):
    """The batches text_arguments point to, for a model of config cfg: one list per domain. A --benchmark's
    first n calibration questions under --protocol (all of them if fewer; every token scored, or with
    answers_only the answers' only, as fine-tuning's loss), or your own --calib text (its first n pieces), both
    tokenized with --tokenizer or the tokenizer record the checkpoint carries, else n task demonstrations of
    each built-in domain (seed: which passages)."""
    benchmark = getattr(args, "benchmark", "")
    if benchmark or args.calib:
        encoding = checkpoint_tokenizer(tokenizer, args.tokenizer, args.ckpt)
        if benchmark:
            return [question_batches(benchmark, encoding, cfg.seq_len, n, args.protocol, answers_only)]
        return [user_batches(args.calib, encoding, cfg, n)]
    corpus = Corpus(args.data_dir)
    corpus.check_model(cfg.vocab_size, cfg.eos_id)
    return [corpus_calibration(corpus, d, n, seed) for d in domains]
