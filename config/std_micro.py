import os

# The standard-MoE twin of emo_micro.py: the same model, data and schedule; only the router differs.
# python train.py config/std_micro.py
exec(open(os.path.join(os.path.dirname(__file__), "emo_micro.py")).read())
out_dir = "out/std_micro"
router = "std"
