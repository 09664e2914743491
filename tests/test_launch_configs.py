"""launch/: every accelerate YAML goes through accelerate's own launch path, every DeepSpeed JSON
validates once its "auto" fields are filled the way the Trainer fills them. Fast; no processes started."""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "launch/accelerate"
DS = ROOT / "launch/deepspeed"
YAMLS = sorted(ACCEL.glob("*.yaml"))
JSONS = sorted(DS.glob("*.json"))
BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def test_the_promised_files_exist():
    assert {p.stem for p in YAMLS} >= {"single_gpu", "multi_gpu", "zero2", "zero3", "zero3_offload", "fsdp2", "cpu_multi"}
    assert {p.stem for p in JSONS} >= {"zero2", "zero3", "zero3_offload"}
    assert (ROOT / "launch/slurm/multinode.sbatch").is_file() and (ROOT / "launch/README.md").is_file()


def launch_args(path, monkeypatch):
    """What `accelerate launch --config_file PATH x.py` decides, and the env it gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)  # configs name their DeepSpeed JSON relative to the repository root
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    env = {}
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    return args, defaults, env


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_accelerate_yaml_goes_through_accelerates_launch_path(path, monkeypatch):
    args, defaults, env = launch_args(path, monkeypatch)
    assert defaults.compute_environment.value == "LOCAL_MACHINE"
    assert defaults.mixed_precision in (None, "no")  # precision belongs to the recipe, not the launch config
    if defaults.distributed_type.value == "DEEPSPEED":
        ds_file = ROOT / defaults.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file() and ds_file.parent == DS
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        # the launched stage builds accelerate's plugin from exactly this env
        for k, v in env.items():
            if k.startswith("ACCELERATE_"):
                monkeypatch.setenv(k, v)
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == json.loads(ds_file.read_text())["zero_optimization"]["stage"]


def test_cpu_multi_starts_n_processes_without_a_gpu(monkeypatch):
    """`--cpu` would start one process; MULTI_GPU + use_cpu takes the torchrun launcher with N processes."""
    args, defaults, env = launch_args(ACCEL / "cpu_multi.yaml", monkeypatch)
    assert args.multi_gpu and not args.cpu and args.num_processes == 2
    assert args.use_cpu is True and env  # multi_gpu_launcher's env: the processes join one gloo group


def test_fsdp2_yaml_gives_an_fsdp2_plugin_with_a_full_state_dict(monkeypatch):
    args, defaults, env = launch_args(ACCEL / "fsdp2.yaml", monkeypatch)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        if k.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(k, v)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # the stage output is a plain safetensors model


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.stem)
def test_deepspeed_json_has_auto_batch_fields_and_gathers_on_save(path):
    cfg = json.loads(path.read_text())
    assert all(cfg[k] == "auto" for k in BATCH_FIELDS)  # else the batch-size assertion fires on any other size
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    if cfg["zero_optimization"]["stage"] == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.stem)
def test_deepspeed_json_validates_once_the_trainer_fills_auto(path, tiny_llama, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from accelerate.utils import DeepSpeedPlugin

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # before a ZeRO-3 config exists (zero.Init)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, max_grad_norm=0.5, report_to=[])
    hf = HfTrainerDeepSpeedConfig(str(path))  # registers itself globally: ZeRO-3 would reach other tests
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, num_training_steps=10)
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(hf.config)
    ds = DeepSpeedConfig(hf.config)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (8, 2, 4)
    assert ds.gradient_clipping == 0.5
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert ds.zero_optimization_stage == stage
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save
    if "offload" in path.stem:
        assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_param.device == "cpu"
        assert hf.config["optimizer"]["params"]["lr"] == args.learning_rate  # DeepSpeed's CPU Adam, lr from the recipe
    assert DeepSpeedPlugin(hf_ds_config=str(path)).zero_stage == stage


def test_slurm_script_takes_rank_and_address_from_slurm():
    text = (ROOT / "launch/slurm/multinode.sbatch").read_text()
    for needed in ("SLURM_PROCID", "SLURM_NNODES", "SLURM_JOB_NODELIST", "--machine_rank", "--main_process_ip",
                   "--deepspeed_multinode_launcher standard", "srun"):
        assert needed in text, needed
    assert yaml.safe_load((ACCEL / "zero3.yaml").read_text())["num_machines"] == 1  # the script overrides it
