# EMO at toy size for one CPU core (the demo trains it and std_tiny.py side by side), in the release's regime
# (docs/method.md): experts to top_k 16 : 1 like its 128 : 8, so that keeping 12.5% of the experts (8 of 64)
# keeps twice top_k; pools drawn from [k_routed + 1, n_experts] like its [8, 128]; attention masked within
# documents. Its twin std_tiny.py differs in the router only (it says why).
# python train.py config/emo_tiny.py
out_dir = "out/emo_tiny"
data_dir = "data/multidomain"
# model: 4 layers of 64 SwiGLU experts (1 shared), 4 per token; BPE-4096 tokens from data/prepare.py
vocab_size = 4096
eos_id = 4095
seq_len = 256
n_layer = 4
n_head = 4
d_model = 128
n_experts = 64
n_shared = 1
top_k = 4
expert_hidden = 128
rope_theta = 10000.0
router = "emo"
pool_min = 4  # pools of 4..64 experts drawn per document (>= 63 routed masks nothing)
pool_max = 64
doc_attention = True
# training
batch_size = 16
max_steps = 600
lr = 3e-3
warmup_steps = 50
eval_interval = 300
eval_tokens = 8192
log_interval = 25
checkpoint_interval = 100
