# Apple silicon (MPS): ~12M parameters (6400-token vocabulary), 16M tokens; roughly a quarter of an hour on an M1/M2.
#   python pretrain.py config/pretrain_mps.py
n_layer = 6
n_head = 6
n_kv_head = 2
n_embd = 384
block_size = 256
batch_size = 32
grad_accum = 1
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
eval_interval = 500
eval_iters = 40
device = 'mps'
dtype = 'float32'    # MPS autocast is not dependable across macOS/torch versions; fp32 is
