"""Post-training: supervised fine-tuning (`sft`) and reinforcement learning with GRPO (`rl`), on the pretraining
Trainer and the inference Engine."""
