"""A length-grouped train sampler whose order is a function of (seed, epoch) only.

transformers' `LengthGroupedSampler` draws its permutation from the global torch RNG at the moment the
epoch's iterator is created. A resumed run reaches that moment with a different RNG history (checkpoint
loading, ZeRO-3 partitioning), so it skipped the first N batches of a *different* order and ended
elsewhere than the uninterrupted run. Seeding a private generator per epoch (the way accelerate's
`SeedableRandomSampler` does for plain shuffling) makes the order reproducible across resumes, processes
and re-runs.
"""
from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class SeededLengthGroupedSampler(LengthGroupedSampler):
    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def seed_length_grouping(trainer) -> None:
    """Give `trainer` the seeded sampler when it would build a length-grouped one."""
    build = trainer._get_train_sampler

    def train_sampler(train_dataset=None):
        sampler = build(train_dataset)
        if type(sampler) is not LengthGroupedSampler:
            return sampler
        args = trainer.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return SeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)

    trainer._get_train_sampler = train_sampler
