"""Recipe parsing: TrlParser semantics, our typed groups, errors that name the key."""
import os

import pytest

from stages.core.config import DataArguments, PolicyArguments, RunArguments
from stages.core.errors import ConfigError
from stages.core.stage import parse_stage


def _sft_config():
    from trl import SFTConfig

    return SFTConfig


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_recipe_keys_are_defaults_and_cli_flags_override(tmp_path):
    r = write(tmp_path, "model_name_or_path: m\noutput_dir: out\nlearning_rate: 0.001\nlora_r: 8\npeft_method: lora\n")
    args = parse_stage(_sft_config(), ["--config", r, "--learning_rate", "0.5", "--lora_alpha", "64"])
    assert args.training.learning_rate == 0.5
    assert args.model.lora_r == 8 and args.model.lora_alpha == 64
    assert args.policy.peft_method == "lora"
    assert {"learning_rate", "lora_alpha", "lora_r"} <= args.explicit


def test_env_block_is_exported(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_TEST_ENV", raising=False)
    r = write(tmp_path, "output_dir: out\nenv:\n  RLHF_TEST_ENV: hello\n")
    parse_stage(_sft_config(), ["--config", r])
    assert os.environ["RLHF_TEST_ENV"] == "hello"
    monkeypatch.delenv("RLHF_TEST_ENV")


def test_unknown_recipe_key_is_named_with_suggestion(tmp_path):
    r = write(tmp_path, "output_dir: out\nlearnng_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'learnng_rate' \(did you mean 'learning_rate'\?\)"):
        parse_stage(_sft_config(), ["--config", r])


def test_unknown_cli_flag_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown command-line option '--lora_rank' \(did you mean '"):
        parse_stage(_sft_config(), ["--output_dir", "x", "--lora_rank", "4"])


def test_invalid_values_name_their_key():
    with pytest.raises(ConfigError, match="peft_method: unknown method 'lorra'.*did you mean 'lora'"):
        PolicyArguments(peft_method="lorra")
    with pytest.raises(ConfigError, match="on_long"):
        DataArguments(on_long="cut")
    with pytest.raises(ConfigError, match="validation_fraction"):
        DataArguments(validation_fraction=1.5)
    with pytest.raises(ConfigError, match="precision"):
        RunArguments(precision="fp8")


def test_missing_recipe_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        parse_stage(_sft_config(), ["--config", str(tmp_path / "nope.yaml")])
    r = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        parse_stage(_sft_config(), ["--config", r])


def test_trl_modelconfig_flags_choose_the_method():
    from trl import ModelConfig

    p = PolicyArguments()
    assert p.resolve_method(ModelConfig()) == "full"
    assert p.resolve_method(ModelConfig(use_peft=True)) == "lora"
    assert p.resolve_method(ModelConfig(use_peft=True, use_dora=True)) == "dora"
    assert p.resolve_method(ModelConfig(use_peft=True, load_in_4bit=True)) == "qlora"
    assert PolicyArguments(peft_method="bottleneck").peft_method == "adapters"


def test_cpu_run_gets_use_cpu_and_no_fp16(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    r = write(tmp_path, "output_dir: out\nfp16: true\n")
    args = parse_stage(_sft_config(), ["--config", r])
    assert args.training.use_cpu is True
    assert args.training.fp16 is False  # fp16 is not a CPU precision: bf16 or fp32 instead
    assert args.training.gradient_checkpointing is False  # not set by the recipe: off on CPU
    assert "tensorboard" in args.training.report_to


def test_output_dir_is_required():
    with pytest.raises(ConfigError, match="output_dir"):
        parse_stage(_sft_config(), [])


def test_datasets_accept_json_on_the_command_line(tmp_path):
    args = parse_stage(_sft_config(), ["--output_dir", "o", "--datasets", "a.jsonl", "b.jsonl",
                                        "--column_mapping", '{"prompt": "question"}'])
    assert args.data.datasets == ["a.jsonl", "b.jsonl"]
    assert args.data.column_mapping == {"prompt": "question"}


def test_hardware_defaults_see_command_line_values(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    r = write(tmp_path, "output_dir: out\nmax_length: 256\n")
    short = parse_stage(_sft_config(), ["--config", r])
    assert short.model.attn_implementation == "eager"  # short rows: eager attention on CPU
    long = parse_stage(_sft_config(), ["--config", r, "--max_length", "4096"])
    assert long.model.attn_implementation is None and long.training.max_length == 4096  # long rows keep SDPA
    fp32 = parse_stage(_sft_config(), ["--config", r, "--precision", "fp32"])
    assert fp32.training.bf16 is False
    mine = parse_stage(_sft_config(), ["--config", r, "--attn_implementation", "sdpa"])
    assert mine.model.attn_implementation == "sdpa"


@pytest.mark.parametrize("where", ["recipe", "command line"])
def test_eval_strategy_no_turns_evaluation_and_its_saving_default_off(tmp_path, where):
    """YAML reads a bare `no` as false; the saving default copied from it must still be the strategy "no"."""
    recipe = "model_name_or_path: m\noutput_dir: out\n" + ("eval_strategy: no\n" if where == "recipe" else "")
    argv = ["--config", write(tmp_path, recipe)] + (["--eval_strategy", "no"] if where == "command line" else [])
    args = parse_stage(_sft_config(), argv)
    assert str(args.training.eval_strategy.value) == "no" and str(args.training.save_strategy.value) == "no"


@pytest.mark.parametrize("use_cpu", [True, False])
def test_use_cpu_on_a_gpu_machine_gets_the_cpu_defaults(tmp_path, monkeypatch, use_cpu):
    """The CPU defaults follow the device that trains: `use_cpu: true` on a machine with a GPU trains on the CPU,
    so it gets fp32 weights, eager attention on short rows, no blanket checkpointing, the memory plan, padding to
    a multiple of 32 and the fast paths; the same recipe without it keeps the GPU's choices."""
    import types

    import torch

    from stages.core import fastpath, policy, runtime, stage

    monkeypatch.setattr(runtime, "cuda_available", lambda: True)  # every device decision asks runtime
    recipe = "output_dir: out\nmax_length: 256\n" + ("use_cpu: true\n" if use_cpu else "")
    t = types.SimpleNamespace(use_cpu=use_cpu, padding_free=False, pad_to_multiple_of=None)
    assert runtime.on_cpu(t) is use_cpu
    model_args = types.SimpleNamespace(dtype="bfloat16")
    assert (policy._load_dtype(model_args, t, quantized=False) == torch.float32) is use_cpu
    args = types.SimpleNamespace(training=t, explicit=set())
    stage.pad_lengths_for_reuse(args, "sft")
    assert t.pad_to_multiple_of == (32 if use_cpu else None)
    lm_head_cast = []
    monkeypatch.setattr(fastpath, "compact_lm_head", lambda model: lm_head_cast.append(model) or True)
    model = torch.nn.Linear(2, 2)
    fastpath.install(types.SimpleNamespace(args=types.SimpleNamespace(use_cpu=use_cpu, bf16=False), model=model))
    assert lm_head_cast == ([model] if use_cpu else [])  # the CPU fast paths go where the CPU trains
    if use_cpu:
        parsed = parse_stage(_sft_config(), ["--config", write(tmp_path, recipe)])
        assert parsed.training.use_cpu is True
        assert parsed.model.attn_implementation == "eager"
        assert parsed.training.gradient_checkpointing is False


def test_a_bad_value_is_blamed_on_where_it_was_written(tmp_path):
    good, bad = write(tmp_path, "output_dir: out\n"), write(tmp_path, "output_dir: out\nmax_steps: many\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"^command line: argument --max_steps"):
        parse_stage(_sft_config(), ["--config", good, "--max_steps", "many"])
    with pytest.raises(ConfigError, match=r"bad.yaml: argument --max_steps"):
        parse_stage(_sft_config(), ["--config", bad])


def test_no_validation_rows_turn_the_default_evaluation_off_and_refuse_an_asked_one(tmp_path):
    from stages.core import stage

    one = tmp_path / "one.jsonl"
    one.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    default = parse_stage(_sft_config(), ["--output_dir", str(tmp_path / "o"), "--datasets", str(one)])
    assert str(default.training.eval_strategy.value) == "epoch"  # a validation share is asked for by default
    assert stage.load_stage_data(default, "sft").eval is None  # one row: nothing to hold out
    assert str(getattr(default.training.eval_strategy, "value", default.training.eval_strategy)) == "no"
    asked = parse_stage(_sft_config(), ["--output_dir", str(tmp_path / "o"), "--datasets", str(one),
                                        "--eval_strategy", "steps"])
    with pytest.raises(ConfigError, match="eval_strategy: steps evaluates on validation rows, but there are none"):
        stage.load_stage_data(asked, "sft")
