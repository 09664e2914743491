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
    cfg = smollm2_shape()  # no attention implementation chosen: planned as eager, the costlier one
    # per layer and token 1.25 x 14 bytes x (576 + 1536) = 36,960, plus 1.25 x 5.6 bytes x 9 heads = 63 per key:
    # 4 rows of 512: 2,048 x (36,960 + 63 x 512) = 141,754,368 bytes per layer; 2 GiB holds 15 of them
    assert runtime.layers_without_checkpointing(cfg, 4, 512, 2 * 2**30) == 15
    assert runtime.layers_without_checkpointing(cfg, 8, 512, 2 * 2**30) == 7  # twice the rows: 283.5 MB
    # the same 2,048 tokens as 2 rows of 1,024: the softmax grows with the length, 2,048 x 101,472: 10 layers
    assert runtime.layers_without_checkpointing(cfg, 2, 1024, 2 * 2**30) == 10
    assert runtime.layers_without_checkpointing(cfg, 4, 512, 64 * 2**30) == 30
    assert runtime.layers_without_checkpointing(cfg, 4, 512, int(0.1 * 2**30)) == 0
    # fp32 saves more per token (1.25 x 21 x 2,112 = 55,440) and less per key (4 bytes): 2,048 x 78,480 -> 13
    assert runtime.layers_without_checkpointing(cfg, 4, 512, 2 * 2**30, half=False) == 13


def test_fused_attention_costs_nothing_per_key_position():
    cfg = smollm2_shape()
    cfg._attn_implementation = "sdpa"
    assert runtime.activation_rates(cfg) == (36960.0, 0.0)
    # 2,048 x 36,960 = 75,694,080 bytes per layer: 2 GiB holds 28, whatever the row length
    assert runtime.layers_without_checkpointing(cfg, 4, 512, 2 * 2**30) == 28
    assert runtime.layers_without_checkpointing(cfg, 2, 1024, 2 * 2**30) == 28


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


def test_longer_rows_keep_fewer_layers_at_the_same_token_count_under_eager_attention(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    # 40 tokens: 4 rows of 10 cost 40 x (100 + 10 x 10) = 8,000 per layer, 2 rows of 20 cost 40 x 300 = 12,000
    callback = SelectiveCheckpointing(budget=16_000, bytes_per_token_and_layer=100.0,
                                      bytes_per_token_key_and_layer=10.0)
    callback.on_train_begin(types.SimpleNamespace(gradient_checkpointing=True), None, None, model=model)
    model(input_ids=torch.randint(3, 100, (4, 10)))
    model(input_ids=torch.randint(3, 100, (2, 20)))
    assert len(layers) == 2 and callback.kept == [2, 1]
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]


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
    cfg = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").config  # the CPU default
    one_layer = runtime.activation_bytes(cfg, 2, 64) / cfg.num_hidden_layers  # bf16 rates: fp32's hold 1.05 layers
    out = sft.main(["--model_name_or_path", str(tiny_llama), "--datasets", "demo:sft", "--max_train_rows", "8",
                    "--eval_datasets", "[]", "--validation_fraction", "0", "--max_length", "64",
                    "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no",
                    "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--compare_with_base", "false",
                    "--memory_budget_gb", str(1.5 * one_layer / 2**30), "--peft_method", "lora"])
    assert len(made) == 1 and made[0].kept  # the plan ran on the training forward
    manifest = json.loads((out / "manifest.json").read_text())
    # the plan carries the rates of the stage's own precision and attention (eager on CPU: a cost per key too)
    half = bool(manifest["config"]["training"]["bf16"])
    assert (made[0].per_token, made[0].per_key) == runtime.activation_rates(cfg, half=half) and made[0].per_key > 0
    assert made[0].kept == [1]  # the demo rows exceed 64 tokens: a 2 x 64 batch, 1.5 layers' worth: one kept
    derived = manifest["derived"]
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


def test_concatenated_batches_are_planned_as_one_sequence():
    from stages.core.stage import batch_shape

    padded = types.SimpleNamespace(padding_free=False, packing=False)
    assert batch_shape(padded, 4, 512) == (4, 512) and batch_shape(padded, 4, 384, 2) == (8, 384)
    # padding-free and TRL's best-fit packing feed one row of every token: the square is over all of them
    assert batch_shape(types.SimpleNamespace(padding_free=True, packing=False), 4, 512) == (1, 2048)
    def packed(strategy):
        return types.SimpleNamespace(padding_free=False, packing=True, packing_strategy=strategy)

    assert batch_shape(packed("bfd"), 4, 512) == (1, 2048) and batch_shape(packed("wrapped"), 4, 512) == (4, 512)
    cfg = smollm2_shape()
    one_row = runtime.activation_bytes(cfg, *batch_shape(types.SimpleNamespace(padding_free=True), 4, 512))
    assert one_row > runtime.activation_bytes(cfg, 4, 512)  # same tokens, a 4x longer softmax row


def test_micro_batch_is_the_largest_divisor_that_fits_the_budget_or_the_token_floor_hand_computed():
    from stages.core.stage import split_batch_for_memory

    def split(batch, row, rows_per_example, budget_gib):
        t = types.SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=2,
                                  bf16=True, fp16=False)
        split_batch_for_memory(types.SimpleNamespace(training=t), types.SimpleNamespace(config=smollm2_shape()),
                               "test", row, rows_per_example, int(budget_gib * 2**30))
        return t.per_device_train_batch_size, t.gradient_accumulation_steps

    # SmolLM2-135M (eager) keeps 30 x (36,960 + 63 x length) bytes per token: a reward pair at 384 (768 tokens)
    # is 1.41 GB, over 1 GiB but at the 1,024-token floor: one pair per micro-batch
    assert split(8, 384, 2, 1.0) == (1, 16)
    assert split(4, 512, 1, 1.0) == (2, 4)    # SFT rows at 512: two rows are 1,024 tokens, the floor; four 4.25 GB
    assert split(8, 130, 1, 1.0) == (4, 4)    # short rows: 4 x 130 = 520 <= 1,024; 8 x 130 is 1.41 GB, over both
    assert split(8, 384, 2, 8.0) == (4, 4)    # four pairs 5.64 GB fit 8 GiB (8.59 GB), eight (11.27 GB) do not
    assert split(3, 384, 2, 1.0) == (1, 6)    # a batch of 3 splits into ones: divisors only


def test_only_losses_that_are_means_over_pairs_are_split_into_micro_batches():
    from stages.core.preference import loss_is_a_mean_over_pairs

    def dpo(loss_type, rpo_alpha=None):
        return types.SimpleNamespace(loss_type=loss_type, rpo_alpha=rpo_alpha)

    assert loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid"])) and loss_is_a_mean_over_pairs("dpo", dpo(["ipo", "hinge"]))
    assert not loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid", "sft"]))  # token mean per batch
    assert not loss_is_a_mean_over_pairs("dpo", dpo(["sigmoid"], rpo_alpha=1.0))  # adds a token-mean NLL
    assert not loss_is_a_mean_over_pairs("kto", dpo(["kto"])) and not loss_is_a_mean_over_pairs("orpo", dpo(["sigmoid"]))
