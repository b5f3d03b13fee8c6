# One GPU, ~26M parameters with the default 6400-token vocabulary: the shape of the small Chinese chat models
# (MiniMind-26M: 8 layers, width 512, 8 query / 2 key-value heads). 131k tokens per step.
#   python pretrain.py config/pretrain_gpu_small.py --dataset=NAME    # a real corpus (see prepare.py)
# 5000 steps = 655M tokens: meant for a real corpus. The embedded world (~0.9M tokens) is memorised long before;
# on it add --max_iters=300 --eval_interval=100.
n_layer = 8
n_head = 8
n_kv_head = 2
n_embd = 512
block_size = 512
batch_size = 64
grad_accum = 4
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
weight_decay = 0.1
eval_interval = 500
eval_iters = 50
log_interval = 20
