"""rlhf-suite stage entry points (sft, rm, dpo, ppo, ...) and their shared core."""
