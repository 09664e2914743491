"""The recipes of the online-DPO, CPO/SimPO and vLLM-PPO stages parse into their stage's config as written."""
from pathlib import Path

import pytest

from stages import registry
from stages.core.stage import parse_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage,recipe,expect", [
    ("cpo", "smollm2-135m/cpo.yaml", {"loss_type": "sigmoid", "cpo_alpha": 1.0}),
    ("cpo", "smollm2-135m/simpo.yaml", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5}),
    ("cpo", "qwen2.5-7b/simpo-qlora.yaml", {"loss_type": "simpo", "beta": 2.5}),
    ("cpo", "tiny/cpo.yaml", {"beta": 1.0}),
    ("online_dpo", "smollm2-135m/online_dpo.yaml", {"max_new_tokens": 80, "beta": 0.1}),
    ("online_dpo", "qwen2.5-7b/online_dpo-lora.yaml", {"reward_model": "runs/qwen2.5-7b/rm-lora"}),
    ("online_dpo", "tiny/online_dpo.yaml", {"max_steps": 3}),
    ("ppo", "qwen2.5-7b/ppo-lora-vllm.yaml", {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}),
])
def test_recipe_parses_into_its_stage_config(stage, recipe, expect, tmp_path):
    extra = ["--output_dir", str(tmp_path / "out")] if recipe.startswith("tiny/") else []  # tiny recipes leave it to the test
    args = parse_stage(registry.get(stage).config_class(), ["--config", str(ROOT / "recipes" / recipe), *extra], stage=stage)
    for key, value in expect.items():
        assert getattr(args.training, key) == value, key
