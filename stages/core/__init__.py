"""Shared pieces every stage uses: config, models, policy, data, artifacts, runtime."""
