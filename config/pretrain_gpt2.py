# One GPU (or torchrun on several), GPT-2-124M class: 12 layers, width 768, 12 heads, 1024-token context;
# ~0.5M tokens per step as in GPT-2 (12 x 1024 x 40). The parameter count depends on the tokenizer's vocabulary:
# ~110M with 32k tokens, ~124M with GPT-2's 50k. 8000 steps = ~4B tokens: two passes over 2M FineWeb-Edu
# documents (~2B tokens; prepare.py holds their text in memory, ~9 GB, and tokenizes for an hour or more):
#   python prepare.py --source=HuggingFaceFW/fineweb-edu --subset=sample-10BT --dataset=fineweb_edu \
#       --kind=pretrain --vocab_size=32000 --max_rows=2000000
#   python pretrain.py config/pretrain_gpt2.py
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/pretrain_gpt2.py   # grad_accum is split over GPUs
# TinyStories (~0.5B tokens): prepare --source=roneneldan/TinyStories --dataset=tinystories --max_rows=0, then
#   python pretrain.py config/pretrain_gpt2.py --dataset=tinystories --out_dir=checkpoints/pretrain_tinystories \
#       --max_iters=2000 --warmup_iters=200
dataset = 'fineweb_edu'
out_dir = 'checkpoints/pretrain_gpt2'
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
block_size = 1024
batch_size = 12
grad_accum = 40
max_iters = 8000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 400
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 500
eval_iters = 100
log_interval = 20
