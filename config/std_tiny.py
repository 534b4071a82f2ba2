import os

# The standard-MoE twin of emo_tiny.py: the same model, data and schedule; every token routes on its own.
# python train.py config/std_tiny.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_tiny.py")).read())
out_dir = "out/std_tiny"
router = "std"
