"""`rlhf plan` against figures computed by hand for known configs, and against DeepSpeed's and PEFT's own counts."""
import json

import pytest

from stages import plan as P

# A Llama config small enough to count by hand: hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads
# (head dim 16, so k/v project to 32), vocabulary 400, untied output layer.
EMBED = 400 * 64  # 25,600, also the output layer: the largest single module
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q k v o, gate up down, 2 norms = 36,992
TOTAL = EMBED + 2 * LAYER + 64 + EMBED  # + final norm + lm_head = 125,248
LINEAR = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # 73,728 weights in q k v o gate up down
LORA_PER_RANK = 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # in + out per linear layer: 2,048


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("small-llama")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=400, tie_word_embeddings=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def shape(small):
    return P.model_shape(P.load_config(str(small)))


def test_counts_from_the_config_match_the_hand_count(shape):
    assert (TOTAL, EMBED, LINEAR, LORA_PER_RANK) == (125_248, 25_600, 73_728, 2_048)
    assert (shape.total, shape.largest_layer, shape.linear, shape.lora_per_rank) == (TOTAL, EMBED, LINEAR, LORA_PER_RANK)
    assert (shape.hidden, shape.kv_hidden, shape.intermediate, shape.layers, shape.vocab) == (64, 32, 128, 2, 400)


def test_counts_match_deepspeed_and_peft_on_the_materialised_model(small, shape):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small))
    assert model_to_params(model) == (shape.total, shape.largest_layer)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert peft.get_nb_trainable_parameters()[0] == shape.lora(8) == 8 * LORA_PER_RANK


def test_config_json_file_and_tied_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64).save_pretrained(tmp_path)
    s = P.model_shape(P.load_config(str(tmp_path / "config.json")))
    per_layer = 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 + 32 * 128 + 128 + 128 * 32 + 32  # ln, attn, ln, mlp
    assert s.total == 100 * 32 + 64 * 32 + 2 * per_layer + 2 * 32  # wte (tied with lm_head), wpe, blocks, ln_f
    assert s.lora_per_rank == 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # Conv1D layers count as linear


def test_full_fine_tuning_states_on_two_gpus_by_hand_and_by_deepspeed(shape):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    def states(option):
        return P.model_states(shape, option, method="full", gpus_per_node=2, nodes=1, lora_r=8, weight_bytes=2,
                              stage="sft")

    assert states("zero0") == (8 * TOTAL, 0) == (1_001_984, 0)  # bf16 weights, grads, AdamW m and v
    assert states("zero2")[0] == 2 * TOTAL + 18 * TOTAL // 2 == 1_377_728
    assert states("zero3")[0] == 4 * EMBED + 18 * TOTAL // 2 == 1_229_632
    assert states("zero3_offload") == (4 * EMBED, int(18 * TOTAL * 1.5)) == (102_400, 3_381_696)
    # the same figures from DeepSpeed's own estimators
    assert states("zero2")[0] == estimate_zero2_model_states_mem_needs(TOTAL, 2, 1, cpu_offload=False)[1]
    assert states("zero3")[0] == estimate_zero3_model_states_mem_needs(TOTAL, EMBED, 2, 1, cpu_offload=False)[1]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(TOTAL, EMBED, 2, 1, cpu_offload=True, cpu_offload_params=True)
    assert states("zero3_offload") == (gpu, cpu)


def test_lora_and_qlora_states_by_hand(shape):
    def states(option, method, stage="sft"):
        return P.model_states(shape, option, method=method, gpus_per_node=2, nodes=1, lora_r=8, weight_bytes=2,
                              stage=stage)

    t = 8 * LORA_PER_RANK  # 16,384 adapter params
    assert states("zero0", "lora")[0] == 2 * TOTAL + 16 * t == 512_640  # bf16 base + fp32 adapter states
    assert states("zero2", "lora")[0] == 2 * TOTAL + 2 * t + 18 * t // 2 == 430_720
    assert states("zero3", "lora")[0] == TOTAL + 4 * EMBED + 18 * t // 2 == 375_104  # base sharded over 2
    nf4 = 2 * (TOTAL - LINEAR) + 0.515875 * LINEAR  # 4.127 bits per linear weight, the rest bf16
    assert states("zero0", "qlora")[0] == int(nf4 + 16 * t) == 403_218
    assert states("zero3_offload", "qlora") is None
    assert states("zero0", "full", "dpo")[0] == 8 * TOTAL + 2 * TOTAL  # + the frozen reference copy
    assert states("zero3", "full", "dpo")[0] == 4 * EMBED + 9 * TOTAL + TOTAL  # reference sharded too


def test_activations_by_hand(shape):
    per_layer = 2 * (6 * 64 + 2 * 32 + 4 * 128)  # 1,920 bytes per token and layer
    logits = 8 * 400
    act = lambda **kw: P.activations(shape, seq_len=16, batch=1, **kw)  # noqa: E731
    assert act(checkpointing=False, stage="sft") == 16 * (2 * per_layer + logits) == 112_640
    assert act(checkpointing=True, stage="sft") == 16 * (2 * 2 * 64 + per_layer + logits) == 86_016
    assert act(checkpointing=False, stage="dpo") == 2 * 112_640  # chosen and rejected
    assert act(checkpointing=False, stage="rm") == 2 * 16 * 2 * per_layer  # pairs, no vocabulary logits


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(d)
    return str(d)


def test_llama2_7b_published_count_and_zero3_on_eight_gpus(llama7b):
    p = P.plan(llama7b, gpus=8, gpu_mem_gib=40, method="full", stage="dpo")
    assert p["shape"]["total"] == 6_738_415_616  # Llama-2-7B's published parameter count
    rows = {r["option"]: r for r in p["options"]}
    embed = 32000 * 4096
    want = 4 * embed + 18 * 6_738_415_616 // 8 + 2 * 6_738_415_616 / 8  # ZeRO-3 states + sharded DPO reference
    assert rows["zero3"]["model_states_gib"] * P.GiB == pytest.approx(want, rel=1e-9)
    assert not rows["zero0"]["fits"] and not rows["zero2"]["fits"] and rows["zero3"]["fits"]
    assert p["pick"] == "zero3" and p["config"] == "launch/accelerate/zero3.yaml"


def test_pick_is_the_fastest_option_that_fits(llama7b):
    assert P.plan(llama7b, gpus=8, gpu_mem_gib=80, method="full")["config"] == "launch/accelerate/multi_gpu.yaml"
    assert P.plan(llama7b, gpus=1, gpu_mem_gib=24, method="qlora")["config"] == "launch/accelerate/single_gpu.yaml"
    assert P.plan(llama7b, gpus=1, gpu_mem_gib=24, method="full")["pick"] == "zero3_offload"
    none = P.plan(llama7b, gpus=1, gpu_mem_gib=2, method="full")
    assert none["pick"] is None and "Nothing fits" in P.render(none)


def test_cli_prints_a_table_or_json_and_reports_bad_input(small, llama7b, capsys):
    from stages import cli

    assert P.main(["--model", llama7b, "--gpus", "2", "--nodes", "2", "--gpu-mem", "80", "--method", "lora"]) == 0
    out = capsys.readouterr().out
    assert "6.74B params" in out and "zero3_offload" in out and "sbatch --nodes 2 launch/slurm/multinode.sbatch" in out
    assert P.main(["--model", str(small), "--gpu-mem", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shape"]["total"] == TOTAL and data["pick"] == "zero0"
    assert P.main(["--model", "./no/such/model", "--gpu-mem", "16"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    if "plan" in cli.COMMANDS:
        assert cli.main(["plan", "--model", str(small), "--gpu-mem", "16"]) == 0
