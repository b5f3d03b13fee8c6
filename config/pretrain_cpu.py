# Tiny CPU pretraining: the defaults of pretrain.py, spelled out. A few minutes on 2 cores; on the embedded world
# data set the val loss falls steadily and the sample reads like the corpus.
#   python pretrain.py config/pretrain_cpu.py
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 256
batch_size = 16
grad_accum = 1
max_iters = 1000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 200
eval_iters = 20
device = 'cpu'
