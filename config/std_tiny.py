import os

# The standard-MoE twin of emo_tiny.py: the same model, data and schedule; every token routes on its own and,
# as in the release's baseline, attends across the packed sequence (no document mask).
# python train.py config/std_tiny.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_tiny.py")).read())
out_dir = "out/std_tiny"
router = "std"
doc_attention = False
