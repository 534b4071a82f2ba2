import os

# The standard-MoE twin of emo_small.py: the same model, data and schedule, attention masked within documents
# too; only the router differs (as config/std_tiny.py, which says why).
# python train.py config/std_small.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_small.py")).read())
out_dir = "out/std_small"
router = "std"
