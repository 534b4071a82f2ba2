import os

# The standard-MoE twin of emo_full.py (the release's StdMoE_1b14b_1T): the same model, data and schedule;
# every token routes on its own, and, as in the release's baseline, attention runs across the packed
# sequence (no document mask). The twins differ where the release's twins differ: router and mask.
exec(open(os.path.join(os.path.dirname(__file__), "emo_full.py")).read())
out_dir = "out/stdmoe_full"
router = "std"
doc_attention = False
