# EMO at toy size for one CPU core (the demo trains it and std_tiny.py side by side): ~10 min.
# Its twin std_tiny.py differs only in the router.
# python train.py config/emo_tiny.py
out_dir = "out/emo_tiny"
data_dir = "data/multidomain"
# model: 4 layers of 16 SwiGLU experts (1 shared), 4 per token; BPE-4096 tokens from data/prepare.py
vocab_size = 4096
eos_id = 4095
seq_len = 256
n_layer = 4
n_head = 4
d_model = 128
n_experts = 16
n_shared = 1
top_k = 4
expert_hidden = 128
rope_theta = 10000.0
router = "emo"
pool_min = 2  # pools of 2..15 of the 15 routed experts, drawn per document
pool_max = 15
doc_attention = False
# training
batch_size = 16
max_steps = 700
lr = 3e-3
warmup_steps = 50
eval_interval = 350
eval_tokens = 8192
log_interval = 25
checkpoint_interval = 100
