# nanoEMO's two commands: `make demo` (the main job) and `make test` (the tests).
# Both install the pinned requirements into .venv first (once, again when requirements.txt changes).
#   make demo: prepare the corpus, train emo_tiny and std_tiny side by side (one core each), then prune
#              every domain at 100/50/25/12.5% of the experts and evaluate loss, next-token and task
#              accuracy, one model per core, and combine: out/sweep_tiny/ (table, plots, training curves).
#              Safe to interrupt: run it again and each step resumes or is skipped once done.
#   make paper: after make demo, the paper's other experiments on its two models, with a second seed (scripts/paper.sh,
#              experiments/paper.py: pruned as is and fine-tuned against memory-matched models trained from
#              scratch, merging back, selection methods, calibration size, composition, the twins' retention;
#              experiments/analyze.py: specialization): results/tiny_cpu/paper/, rows in out/paper/.
#   make regime: the regime where sparsity pays (config/*_micro.py, scripts/regime.sh): the premise with two seeds,
#              the gaps against tokens, EMO's retention against models trained from scratch: results/micro_cpu/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHELL := bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: test demo corpus paper regime

# glibc hands freed buffers of more than a few MB back to the system, and every training step then page-faults
# its activations in afresh; keeping them (mmap threshold 32 MB, no trimming below 16 GB) made the demo's CPU
# trainings about 8% faster on this project's 2-core machine. It changes no result.
KEEP_FREED_MEMORY := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184

$(VENV)/installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q

corpus: $(VENV)/installed
	test -f data/multidomain/meta.json || $(PY) -m data.prepare

# resume when a checkpoint exists (a finished run then does nothing); one thread each, two runs at once.
# (not .PHONY: make ignores pattern rules for phony targets; no file of that name exists, so it always runs)
train-%: corpus
	$(KEEP_FREED_MEMORY) OMP_NUM_THREADS=1 $(PY) train.py config/$*.py $$(test -f out/$*/ckpt.pt && echo --init_from=resume) \
		| sed -u 's/^/[$*] /'

# one model's sweep (both models' pruning and evaluation are independent: one per core)
sweep-%: corpus
	$(KEEP_FREED_MEMORY) OMP_NUM_THREADS=1 $(PY) -m experiments.sweep --ckpt out/$* --out out/sweeps/$* \
		> out/sweeps_$*.log 2>&1

demo: corpus
	$(MAKE) -j2 train-emo_tiny train-std_tiny
	mkdir -p out
	$(MAKE) -j2 sweep-emo_tiny sweep-std_tiny
	$(PY) -m experiments.report --combine out/sweeps/emo_tiny,out/sweeps/std_tiny --out out/sweep_tiny
	$(PY) -m experiments.report --curves out/emo_tiny,out/std_tiny --out out/sweep_tiny

paper: corpus
	bash scripts/paper.sh

regime: $(VENV)/installed
	bash scripts/regime.sh
