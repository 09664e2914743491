"""Activation memory planned against `memory_budget_gb`: selective checkpointing, exact gradients."""
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from stages.core import runtime
from stages.core.memory import SelectiveCheckpointing, decoder_layers, keep_activations

ROOT = Path(__file__).resolve().parents[1]


def smollm2_shape():
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152)


def test_budget_keeps_as_many_layers_as_fit_hand_computed():
    # 40 bytes x (576 + 1536) x 2,048 tokens = 173,015,040 bytes per layer; 2 GiB holds 12 of them
    assert runtime.layers_without_checkpointing(smollm2_shape(), 4 * 512, 2 * 2**30) == 12
    # 1,024 tokens halve the per-layer cost: 24 layers; 64 GiB holds all 30; 0.1 GiB none
    assert runtime.layers_without_checkpointing(smollm2_shape(), 2 * 512, 2 * 2**30) == 24
    assert runtime.layers_without_checkpointing(smollm2_shape(), 2048, 64 * 2**30) == 30
    assert runtime.layers_without_checkpointing(smollm2_shape(), 2048, int(0.1 * 2**30)) == 0


def test_default_budget_is_a_quarter_of_available_memory_at_most_half_a_gib():
    assert runtime.memory_budget(None, available=1 * 2**30) == 2**28
    assert runtime.memory_budget(None, available=64 * 2**30) == 2**29
    assert runtime.memory_budget(3.5) == int(3.5 * 2**30)


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_selective_checkpointing_recomputes_only_the_chosen_layers_and_keeps_gradients_exact(tiny_llama):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.train()
    ids = torch.randint(3, 100, (2, 12))
    want = _grads(model, ids)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    assert len(layers) >= 2 and all(layer.gradient_checkpointing for layer in layers)
    keep_activations(layers, 1)
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]

    calls = []  # MLP runs per layer: a checkpointed layer runs twice (forward + recompute), a kept one once
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    got = _grads(model, ids)
    assert calls.count(0) == 2 and calls.count(len(layers) - 1) == 1
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_each_batch_checkpoints_only_as_many_layers_as_its_tokens_need(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    per_token = 1000.0
    callback = SelectiveCheckpointing(budget=int(per_token * 40), bytes_per_token_and_layer=per_token)
    callback.on_train_begin(types.SimpleNamespace(gradient_checkpointing=True), None, None, model=model)
    model(input_ids=torch.randint(3, 100, (2, 4)))  # 8 tokens: every layer's activations fit (5 layers' worth)
    assert [layer.gradient_checkpointing for layer in layers] == [False] * len(layers)
    model(input_ids=torch.randint(3, 100, (2, 20)))  # 40 tokens: one layer fits, the others are checkpointed
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 200)))  # no backward: no plan
    assert callback.kept == [len(layers), 1]


def test_sft_stage_checkpoints_only_layers_over_budget(tiny_llama, tmp_path, monkeypatch):
    """A budget that holds one layer's activations of a worst-case batch: the rest are checkpointed."""
    import json

    from stages import sft
    from stages.core import memory

    made = []
    original = memory.SelectiveCheckpointing.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(memory.SelectiveCheckpointing, "__init__", spy)
    cfg = AutoModelForCausalLM.from_pretrained(tiny_llama).config
    one_layer = runtime.activation_bytes(cfg, 2 * 64) / cfg.num_hidden_layers
    out = sft.main(["--model_name_or_path", str(tiny_llama), "--datasets", "demo:sft", "--max_train_rows", "8",
                    "--eval_datasets", "[]", "--validation_fraction", "0", "--max_length", "64",
                    "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no",
                    "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--compare_with_base", "false",
                    "--memory_budget_gb", str(1.5 * one_layer / 2**30), "--peft_method", "lora"])
    assert len(made) == 1 and made[0].kept  # the plan ran on the training forward
    tokens = 2 * 64  # the demo rows exceed 64 tokens, so the batch is 2 x 64
    assert made[0].kept == [memory.layers_to_keep(made[0].budget, made[0].per_token, tokens, cfg.num_hidden_layers)] == [1]
    derived = json.loads((out / "manifest.json").read_text())["derived"]
    assert derived["gradient_checkpointing"] is True and derived["train_sampling_strategy"] == "group_by_length"


FRAGMENTED_HEAP = """
import sys
from stages.core import runtime
def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) // 1024
applied = runtime.return_freed_memory() if sys.argv[1] == "on" else None
big = bytearray(16 << 20); del big        # freeing it raises glibc's dynamic mmap threshold to 16 MiB
blocks = [bytearray(4 << 20) for _ in range(100)]  # 400 MiB of activation-sized blocks
pin = bytearray(1 << 19)                  # allocated above them: the heap top cannot shrink past it
peak = rss_mb(); del blocks
print(applied, peak, rss_mb())
"""


def test_freed_activation_sized_blocks_go_back_to_the_system():
    """Without the fixed threshold, 400 MiB freed below a live block stays resident (a fragmented heap: what
    grew the reward stage's RSS from 2.4 to 4.8 GB between its first two steps); with it, each block was
    its own mapping and freeing it returns the memory."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").exists():
        import pytest

        pytest.skip("reads RSS from /proc (Linux)")
    root = Path(__file__).resolve().parents[1]
    run = lambda mode: subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, mode], cwd=root, capture_output=True,  # noqa: E731
                                      text=True, check=True, timeout=120).stdout.split()
    applied, peak, after = run("on")
    assert applied == "True" and int(peak) - int(after) > 300
    _, peak, after = run("off")
    assert int(peak) - int(after) < 100  # the control: glibc's default keeps it


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_batch_trained_as_micro_batches_reaches_the_same_weights(stage, tiny_llama, tmp_path, monkeypatch):
    """A worst-case batch over the budget trains as micro-batches of one example with gradient accumulation:
    the same rows and loss per optimizer step, so the same weights as whole batches (within float order)."""
    import importlib
    import json

    from safetensors.torch import load_file

    from stages.core import stage as stage_helpers

    monkeypatch.setattr(stage_helpers, "MIN_MICRO_BATCH_TOKENS", 0)  # tiny rows: split down to one example

    data = [] if stage == "sft" else ["--datasets", "demo:preference"]
    outs = {}
    for split in ("true", "false"):
        out = tmp_path / f"{stage}-{split}"
        importlib.import_module(f"stages.{stage}").main(
            ["--config", str(ROOT / f"recipes/tiny/{stage}.yaml"), "--model_name_or_path", str(tiny_llama), *data,
             "--eval_datasets", "[]", "--validation_fraction", "0", "--max_train_rows", "16", "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--save_strategy", "no", "--eval_strategy", "no",
             "--precision", "fp32", "--lora_dropout", "0", "--memory_budget_gb", "1e-6",
             "--micro_batches_for_memory", split, "--report_to", "none", "--output_dir", str(out),
             *(["--compare_with_base", "false"] if stage == "sft" else [])])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["training"]["per_device_train_batch_size"] == 4  # the recipe's, either way
        outs[split] = (manifest["derived"].get("micro_batch"), load_file(next(out.glob("*.safetensors"))))
    assert outs["true"][0] == {"micro_batch_size": 1, "gradient_accumulation_steps": 4} and outs["false"][0] is None
    split, whole = outs["true"][1], outs["false"][1]
    assert split.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_micro_batch_is_the_largest_divisor_that_fits_the_budget_or_the_token_floor_hand_computed():
    from stages.core.stage import split_batch_for_memory

    def split(batch, row_tokens, budget_gib):
        t = types.SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=2)
        split_batch_for_memory(types.SimpleNamespace(training=t), types.SimpleNamespace(config=smollm2_shape()),
                               "test", row_tokens, int(budget_gib * 2**30))
        return t.per_device_train_batch_size, t.gradient_accumulation_steps

    # SmolLM2-135M keeps 2.53 MB per token (40 B x 2,112 x 30 layers): 1 GiB holds 423 tokens
    assert split(8, 768, 1.0) == (1, 16)   # reward pairs at 384: one pair (768 tokens) per micro-batch
    assert split(4, 512, 1.0) == (2, 4)    # SFT rows at 512: two rows are 1,024 tokens, the floor
    assert split(8, 130, 1.0) == (4, 4)    # short rows: 4 x 130 = 520 <= 1,024, 8 x 130 is over both
    assert split(8, 768, 8.0) == (4, 4)    # 8 GiB holds 3,389 tokens: four pairs (3,072), not eight (6,144)
    assert split(3, 768, 1.0) == (1, 6)    # a batch of 3 splits into ones: divisors only


def test_only_losses_that_are_means_over_pairs_are_split_into_micro_batches():
    from stages.core.preference import loss_is_a_mean_over_pairs

    def dpo(loss_type, rpo_alpha=None):
        return types.SimpleNamespace(loss_type=loss_type, rpo_alpha=rpo_alpha)

    assert loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid"])) and loss_is_a_mean_over_pairs("dpo", dpo(["ipo", "hinge"]))
    assert not loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid", "sft"]))  # token mean per batch
    assert not loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid"], rpo_alpha=1.0))  # adds a token-mean NLL
    assert not loss_is_a_mean_over_pairs("kto", dpo(["kto"])) and not loss_is_a_mean_over_pairs("orpo", dpo(["sigmoid"]))
