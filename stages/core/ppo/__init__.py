"""PPO (our implementation; TRL removed its PPOTrainer after 1.12) and the reward plumbing GRPO/RLOO share.

config.py (PPOConfig), losses.py (GAE, clipped losses, KL estimators, KL control), rollout.py (generation,
log-probs, values), roles.py (one-base-four-roles PEFT mode / full mode), trainer.py (the loop),
evaluate.py (held-out reward and KL), checkpoint.py, artifact.py, rewards.py.
"""
