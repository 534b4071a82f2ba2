"""Command lines: a user error is one line `error: ...` on stderr and exit status 2 (no traceback), for every
command; and the import graph of the project's modules runs one way (no module imports one that imports it).

    python -m pytest tests/test_cli.py -q
"""

import ast
import glob
import os
import subprocess
import sys

import pytest

import checkpoint
import eval as evaluation
import prune
import train
from data import prepare
from errors import run_command
from tests.conftest import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys, main, argv):
    """Run a command line in-process; return the single stderr line it printed before exiting with 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_train_errors(capsys, tiny_corpus, tmp_path):
    data_dir = tiny_corpus[0]
    assert one_line_error(capsys, train.main, tiny_run(data_dir, tmp_path / "a", "--max_step=5")) == (
        "error: unknown config key 'max_step' from the command line (did you mean 'max_steps'?)")
    assert one_line_error(capsys, train.main, tiny_run(tmp_path / "none", tmp_path / "a")) == (
        f"error: no corpus at '{tmp_path / 'none'}' (missing meta.json): run `python -m data.prepare`")
    assert one_line_error(capsys, train.main, tiny_run(data_dir, tmp_path / "a", "--init_from=resume")) == (
        f"error: init_from='resume' but there is no {tmp_path / 'a' / 'ckpt.pt'}")
    assert one_line_error(capsys, train.main, ["config/no_such.py"]) == (
        "error: config file not found: config/no_such.py")


def test_prune_errors(capsys, tiny_corpus, tiny_checkpoints, tmp_path):
    base = ["--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0], "--out", str(tmp_path / "p")]
    assert one_line_error(capsys, prune.main, [*base, "--domain", "code", "--keep", "0"]) == (
        "error: --keep 0 keeps 0 experts: at least 1 is needed")
    assert one_line_error(capsys, prune.main, [*base, "--domain", "code", "--keep", "0.0"]) == (
        "error: --keep 0.0: a fraction must be in (0, 1]")
    assert one_line_error(capsys, prune.main, [*base, "--domain", "klingon", "--keep", "0.5"]) == (
        "error: unknown domain 'klingon'; this corpus has: english, german, code, math")


def test_benchmark_errors(capsys, tiny_checkpoints, tmp_path):
    line = one_line_error(capsys, evaluation.main, ["--ckpt", tiny_checkpoints["emo"], "--benchmark", "mmlu_chemistry"])
    assert line.startswith("error: no benchmark mmlu_chemistry; the benchmarks are: arc_easy arc_challenge ") and \
        " mmlu_stem " in line and " mmlu_anatomy " in line
    base = ["--ckpt", tiny_checkpoints["emo"], "--keep", "4", "--out", str(tmp_path / "p")]
    assert one_line_error(capsys, prune.main, [*base, "--benchmark", "boolq", "--protocol", "emo"]).startswith(
        "error: boolq under --protocol emo scores every question it has here: none is left to calibrate")
    assert one_line_error(capsys, prune.main, [*base, "--benchmark", "copa,boolq"]) == (
        "error: --benchmark copa,boolq: one benchmark at a time")
    assert one_line_error(capsys, evaluation.main, ["--ckpt", tiny_checkpoints["emo"], "--benchmark", "copa",
                                                    "--data", "x.txt"]) == (
        "error: give --data (text to score) or --benchmark (benchmarks), not both")


def test_truncated_and_foreign_checkpoints_are_named(capsys, tiny_corpus, tiny_checkpoints, tmp_path):
    good = open(os.path.join(tiny_checkpoints["emo"], "ckpt.pt"), "rb").read()
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good[:len(good) // 2])
    foreign.write_text("not a checkpoint at all\n")
    for path in (truncated, foreign):
        line = one_line_error(capsys, evaluation.main, ["--ckpt", str(path), "--data_dir", tiny_corpus[0]])
        assert line.startswith(f"error: {path} is truncated or not a torch checkpoint: torch could not read it (")


def test_eval_checkpoint_and_prepare_errors(capsys, tiny_corpus, tmp_path):
    missing = ["--ckpt", str(tmp_path / "none"), "--data_dir", tiny_corpus[0]]
    assert one_line_error(capsys, evaluation.main, missing) == (
        f"error: checkpoint not found: {tmp_path / 'none'}")
    export = ["--ckpt", str(tmp_path / "none.pt"), "--hf_out", str(tmp_path)]
    assert one_line_error(capsys, checkpoint.main, export) == (
        f"error: checkpoint not found: {tmp_path / 'none.pt'}")
    assert one_line_error(capsys, prepare.main, ["--domains", "bible,klingon", "--out", str(tmp_path / "c")]) == (
        "error: unknown domain 'klingon'; known: bible, dictionary, python, c, math, manpages, german, legal")


def test_a_real_command_line_prints_no_traceback(tiny_corpus, tiny_checkpoints, tmp_path):
    done = subprocess.run([sys.executable, "prune.py", "--ckpt", tiny_checkpoints["emo"], "--data_dir", tiny_corpus[0],
                           "--domain", "code", "--keep", "1.5"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "error: --keep 1.5: a fraction must be in (0, 1]\n"


def project_imports():
    """{module: set of project modules it imports anywhere in its file (functions included)}."""
    files = [f for folder in ("", "data", "experiments") for f in glob.glob(os.path.join(ROOT, folder, "*.py"))
             if not f.endswith("__init__.py")]
    modules = {os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."): f for f in files}
    graph = {}
    for module, path in modules.items():
        names = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        graph[module] = {n for n in names if n in modules and n != module}
    return graph


def test_import_graph_has_no_cycle():
    graph = project_imports()
    state = {}  # module -> 'visiting' or 'done'

    def visit(module, path):
        if state.get(module) == "visiting":
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) == "done":
            return
        state[module] = "visiting"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    # the layers a reader should see: data, kernels, router -> model -> checkpoint/hf -> prune/eval -> train
    assert "checkpoint" not in graph["hf"] and "hf" in graph["checkpoint"]
    assert not graph["model"] & {"checkpoint", "hf", "prune", "eval", "train"}
    assert not graph["prune"] & {"eval", "train"} and "train" not in graph["eval"]


def test_nothing_outside_experiments_imports_them():
    """The top level is the method and its tools; experiments/ uses them, never the other way round."""
    graph = project_imports()
    experiments = {module for module in graph if module.startswith("experiments.")}
    assert experiments >= {"experiments.sweep", "experiments.paper", "experiments.analyze", "experiments.report"}
    leaks = {module: graph[module] & experiments for module in graph if module not in experiments}
    assert not any(leaks.values()), leaks
