# The whole pipeline on real public data sets, one GPU (English: TinyStories -> Alpaca-style SFT -> hh-rlhf).
#   python pipeline.py config/pipeline_gpu.py
# Needs the Hugging Face hub (the data is streamed, row-limited). All stages share the tokenizer trained on
# TinyStories. PPO/GRPO use the reward model alone (these prompts have no checkable answer).
out_dir = 'runs/gpu'
dataset = 'real_en'
prepare_args = (
    '--source=roneneldan/TinyStories --kind=pretrain --max_rows=1000000 --vocab_size=8192',
    '--source=tatsu-lab/alpaca --kind=sft --max_rows=0 --tokenizer=data/real_en',
    '--source=Anthropic/hh-rlhf --kind=pref --max_rows=60000 --tokenizer=data/real_en',
    '--source=Anthropic/hh-rlhf --split=test --kind=prompts --max_rows=8000 --tokenizer=data/real_en',
)
pretrain_args = 'config/pretrain_gpu_small.py --max_iters=3000 --eval_interval=500'
sft_args = '--max_iters=2000 --batch_size=32 --block_size=512 --eval_interval=500 --eval_prompts=0'
dpo_args = '--max_iters=600 --batch_size=16 --block_size=512 --eval_interval=200 --eval_prompts=0'
reward_args = '--max_iters=600 --batch_size=32 --block_size=512 --eval_interval=200'
ppo_args = '--max_iters=200 --batch_size=64 --max_new_tokens=96 --checker_weight=0 --eval_interval=50 --eval_prompts=0'
grpo_args = '--max_iters=200 --batch_size=64 --max_new_tokens=96 --checker_weight=0 --eval_interval=50 --eval_prompts=0'
n_report_prompts = 3
report_max_new_tokens = 96
