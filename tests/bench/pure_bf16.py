"""Pure-bf16 full fine-tuning for the bench (`full-512-pure-bf16`): bf16 weights and gradients, with fp32
master weights and AdamW state in the optimizer. Measured against the stage's default (fp32 weights under
bf16 autocast) to decide whether it should become a default; it is not one (README, Speed)."""
from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 copies of bf16 parameters: gradients are upcast, the step runs in fp32, the result is
    rounded back into the bf16 weights."""

    def __init__(self, params, **adamw):
        self.weights = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.weights]
        self.inner = torch.optim.AdamW(self.master, **adamw)
        self.param_groups, self.defaults, self.state = self.inner.param_groups, self.inner.defaults, self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.weights:
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for master, weight in zip(self.master, self.weights):
            master.grad = None if weight.grad is None else weight.grad.float()
        self.inner.step()
        for master, weight in zip(self.master, self.weights):
            weight.copy_(master)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


def install() -> None:
    """Make transformers' Trainer cast the model to bf16 and train it with MasterWeightAdamW."""
    import transformers

    def create_optimizer(self, *args, **kwargs):
        self.model.to(torch.bfloat16)
        a = self.args
        self.optimizer = MasterWeightAdamW(self.model.parameters(), lr=a.learning_rate, weight_decay=a.weight_decay,
                                           betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        return self.optimizer

    transformers.Trainer.create_optimizer = create_optimizer
