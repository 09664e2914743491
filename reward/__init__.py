"""Reward models, rule rewards, judges and win-rate statistics."""
