# The release's EMO 1B-active / 14B-total model and optimisation (docs/method.md, "The released model").
# 128 GPUs: torchrun --nnodes=16 --nproc_per_node=8 ... train.py config/emo_full.py
# 4 sequences per GPU per micro-step x grad_accum 2 x 128 GPUs = 1024 sequences (4.19M tokens) per step;
# on another number of GPUs scale grad_accum to keep 1024.
out_dir = "out/emo_full"
data_dir = ""  # no local corpus: the release trains on OLMoE-mix-0824 tokenized with dolma2
train_files = "data/olmoe-mix-0824/*.npy"  # OLMo-style uint32 token shards, EOS between documents
train_dtype = "uint32"
tokenizer = "dolma2"  # recorded in the checkpoints (no corpus gives it)
vocab_size = 100352  # dolma2 (cl100k_base extension), padded
eos_id = 100257
seq_len = 4096
n_layer = 16
n_head = 16
d_model = 2048
n_experts = 128
n_shared = 1
top_k = 8
expert_hidden = 1024
rope_theta = 500000.0
router = "emo"
pool_min = 8  # 1/16 of the experts up to all of them; >= 127 routed experts masks nothing
pool_max = 128
doc_attention = True  # the release masks attention within documents for EMO (its baseline does not)
lb_weight = 0.1
z_weight = 0.001
lm_z_weight = 1e-5
parallel = "fsdp"  # a 14B replica per GPU does not fit; fully_shard per block
dtype = "bfloat16"  # bf16 compute; FSDP keeps float32 master weights and reduces gradients in float32
batch_size = 4
grad_accum = 2
max_steps = 238419  # 1T tokens
lr = 4e-3
min_lr_ratio = 0.1  # cosine to 4e-4 (the release then anneals 50B tokens linearly to 0)
warmup_steps = 2000
weight_decay = 0.1
eval_interval = 0
log_interval = 1
checkpoint_interval = 1000
