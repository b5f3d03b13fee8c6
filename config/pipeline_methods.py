# The methods table: every DPO loss type and every GRPO advantage scaling, each from the same SFT model, side by side
# in report.md's "Against SFT" section (gains in greedy and sampled exact match, clean-reply rate, time, sign tests).
#   python pipeline.py config/pipeline_methods.py
# Stages a default run already finished in the same --out_dir (pretrain, sft, dpo, grpo) are kept, not redone.
stages = ('pretrain', 'sft', 'dpo', 'dpo_ipo', 'dpo_hinge', 'dpo_simpo', 'dpo_orpo', 'grpo', 'grpo_batch', 'grpo_none')
