# One seed of the results table: the default pipeline plus sft_clean, SFT on the same data without the demonstration
# flaws (the ceiling that removing them can reach), from the same pretrained model: the clean data is prepared with
# the flawed data's tokenizer, and the pretraining corpus carries no flaw, so it is the same train.bin.
#   for s in 1337 2 3; do python pipeline.py config/pipeline_seeds.py --seed=$s --out_dir=runs/s$s; done
#   python pipeline.py --pool="('runs/s1337','runs/s2','runs/s3')" --out_dir=runs      # -> runs/seeds.md
prepare_args = ('', '--dataset={dataset}_clean --flaw_wrong_language_en=0 --flaw_wrong_language_zh=0 '
                    '--flaw_pleasantry=0 --tokenizer={data}')
stages = ('pretrain', 'sft', 'dpo', 'reward', 'ppo', 'grpo', 'sft_clean')
