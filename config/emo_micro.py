# EMO where sparsity pays on a 2-core CPU (make regime, experiments/regime.py): the release's ratios (64 experts,
# 1 shared, top 4: 12.5% of the experts is twice top_k, 6.25% is top_k; pools drawn from [4, 64]) at a width and
# vocabulary small enough to train about 10 tokens per parameter (embeddings included) in the time of the demo:
# BPE-1024 tokens, d 48, experts of hidden 20. Both twins attend causally (on a CPU the document mask costs a
# quarter of a step, and both then read across documents alike). Twins: std_micro.py (the router only),
# std_micro_e8.py (1/8 of the experts), dense_micro.py (the same active FFN, dense).
# python -m data.prepare --vocab_size 1024 --out data/multidomain_1k && python train.py config/emo_micro.py
out_dir = "out/emo_micro"
data_dir = "data/multidomain_1k"
vocab_size = 1024
eos_id = 1023
seq_len = 256
n_layer = 4
n_head = 4
d_model = 48
n_experts = 64
n_shared = 1
top_k = 4
expert_hidden = 20
rope_theta = 10000.0
router = "emo"
pool_min = 4  # pools of 4..64 experts drawn per document (>= 63 routed masks nothing)
pool_max = 64
doc_attention = False
batch_size = 16
max_steps = 2400
lr = 3e-3
warmup_steps = 120
eval_interval = 300
eval_tokens = 16384
log_interval = 50
checkpoint_interval = 600
