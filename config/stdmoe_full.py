import os

# The standard-MoE twin of emo_full.py (the release's StdMoE_1b14b_1T): the same model, data and schedule;
# every token routes on its own. The release's baseline also drops the document attention mask; here the
# twins differ only in the router, so that the comparison isolates it.
exec(open(os.path.join(os.path.dirname(__file__), "emo_full.py")).read())
out_dir = "out/stdmoe_full"
router = "std"
