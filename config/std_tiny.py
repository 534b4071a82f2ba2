import os

# The standard-MoE twin of emo_tiny.py: the same model, data and schedule, attention masked within documents
# too; only the router differs (every token routes on its own). Why the mask too, where the release's baseline
# has none: the evaluation lays a domain's documents back to back, so a model that attends across documents
# reads the previous document of the same domain, an advantage of the evaluation's layout, not of the router
# (measured: docs/results.md, "What drives the gap").
# python train.py config/std_tiny.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_tiny.py")).read())
out_dir = "out/std_tiny"
router = "std"
