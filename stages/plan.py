"""`rlhf plan`: per-GPU memory for a model, method and GPU count under DDP, ZeRO-2, ZeRO-3 and
ZeRO-3 + CPU offload, and the launch config to pick.

    rlhf plan --model Qwen/Qwen2.5-7B-Instruct --gpus 8 --gpu-mem 80 --method full
    rlhf plan --model path/to/config.json --gpus 1 --gpu-mem 24 --method qlora --seq-len 4096

Parameter counts come from the model's config alone (accelerate's init_empty_weights: nothing is
downloaded but config.json). What is counted, in bytes per GPU (P params, T trainable params,
L largest layer's params, N GPUs in all, w bytes per weight: 2 for bf16, as the stages load on GPU):

- model states, full fine-tuning. ZeRO-0 (DDP): weights, gradients and AdamW's two moments, all in
  the weights' dtype: 4wP (8 B/param in bf16; `--weights-dtype fp32`: 16). ZeRO-2/3 and offload:
  DeepSpeed's own estimators (fp32 master weights and moments): 2P + 18P/N, 4L + 18P/N, and 4L
  with the CPU holding 18P x 1.5 per node.
- LoRA (all linear layers but the output, rank r): the frozen base in 16 bit (2P; 2P/N under
  ZeRO-3, on the CPU under offload) plus the model-state terms above for the T adapter params
  (fp32 adapters under DDP: 16T).
- QLoRA: as LoRA with the linear weights in NF4 + double quantisation, 4.127 bits (0.516 B) each;
  under ZeRO-3 they shard (stored in the compute dtype). No ZeRO offload of 4-bit weights.
- activations, bf16, SDPA/flash attention (no s^2 term), per token and layer:
  2 x (6h + 2h_kv + 4i) bytes (norm inputs, q/k/v, attention output, gate/up/act/product), or with
  gradient checkpointing 2h per layer plus one layer recomputed; logits 8 B per token and vocab
  entry (fp32 logits and their gradient), none for a reward model. RM and DPO run chosen and
  rejected together: twice the sequences. Full-parameter DPO keeps a frozen reference copy: 2P
  (2P/N under ZeRO-3, none on the GPU under offload).
- 2 GiB per GPU for the CUDA context, NCCL/DeepSpeed buffers and allocator slack.

These are estimates to choose a launch config, not guarantees: measure the first steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.core.errors import ConfigError, ModelError, UserError

GiB = 1024**3
OVERHEAD = 2 * GiB
NF4_BYTES = (4 + 0.127) / 8  # 4-bit weights + double-quantised absmax constants
LOGIT_BYTES = 8
OPTIONS = ("zero0", "zero2", "zero3", "zero3_offload")  # fastest first


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model config."""

    total: int  # parameters (tied weights once)
    largest_layer: int  # parameters of the largest single module
    linear: int  # weights of the linear layers LoRA targets and bitsandbytes quantises (all but the output)
    lora_per_rank: int  # sum over those layers of in + out features
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int

    def lora(self, r: int) -> int:
        return r * self.lora_per_rank


def load_config(model: str, trust_remote_code: bool = False):
    """A transformers config from a config.json, a model dir, a built-in alias or a Hub id."""
    from transformers import AutoConfig

    p = Path(model).expanduser()
    try:
        if p.is_file() and p.suffix == ".json":
            return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        from stages.core.models import resolve_model

        return AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as e:  # OSError (not found / offline), ValueError (unknown model type)
        raise ModelError(f"could not read a model config from '{model}': {e}") from None


def model_shape(config, trust_remote_code: bool = False) -> Shape:
    """Count parameters on an empty (meta-device) model built from the config."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # an empty model comes untied: tied input/output embeddings would count twice
    from transformers.pytorch_utils import Conv1D

    out = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not out]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return Shape(
        total=sum(p.numel() for p in model.parameters()),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        linear=sum(m.weight.numel() for m in linear),
        lora_per_rank=sum(sum(m.weight.shape) for m in linear),  # in + out features (Linear and GPT-2's Conv1D)
        hidden=hidden, kv_hidden=kv_heads * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        layers=getattr(text, "num_hidden_layers", None) or text.n_layer, vocab=text.vocab_size)


def deepspeed_states(params: int, largest_layer: int, zero: int, gpus_per_node: int, nodes: int,
                     offload: bool) -> tuple[int, int]:
    """(GPU, CPU-per-node) bytes of trainable model states from DeepSpeed's own estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes,
                                                            cpu_offload=offload, cpu_offload_params=offload)
    return int(gpu), int(cpu)


def activations(shape: Shape, *, seq_len: int, batch: int, checkpointing: bool, stage: str) -> int:
    """Activation bytes per GPU for one micro-batch (see the module docstring for the terms)."""
    seqs = batch * (2 if stage in ("rm", "dpo") else 1)
    per_layer = 2 * (6 * shape.hidden + 2 * shape.kv_hidden + 4 * shape.intermediate)
    if checkpointing:
        per_token = shape.layers * 2 * shape.hidden + per_layer
    else:
        per_token = shape.layers * per_layer
    logits = 0 if stage == "rm" else LOGIT_BYTES * shape.vocab
    return seqs * seq_len * (per_token + logits)


def model_states(shape: Shape, option: str, *, method: str, gpus_per_node: int, nodes: int, lora_r: int,
                 weight_bytes: int, stage: str) -> tuple[int, int] | None:
    """(GPU, CPU-per-node) bytes for weights, gradients, optimizer and reference model; None: not supported."""
    n = gpus_per_node * nodes
    zero = {"zero0": 0, "zero2": 2, "zero3": 3, "zero3_offload": 3}[option]
    offload = option == "zero3_offload"
    if method == "qlora" and offload:
        return None
    if method == "full":
        trainable, frozen = shape.total, 0.0
    else:
        trainable = shape.lora(lora_r)
        frozen = 2.0 * shape.total if method == "lora" else (
            2.0 * (shape.total - shape.linear) + NF4_BYTES * shape.linear)
    if method == "full" and stage == "dpo":
        frozen += 2.0 * shape.total  # the frozen reference copy
    if zero == 0:
        per_param = 4 * weight_bytes if method == "full" else 16
        return int(per_param * trainable + frozen), 0
    gpu, cpu = deepspeed_states(trainable, shape.largest_layer, zero, gpus_per_node, nodes, offload)
    if offload:
        return gpu, int(cpu + 1.5 * frozen / nodes)
    return int(gpu + (frozen / n if zero == 3 else frozen)), cpu


def launch_config(option: str, total_gpus: int) -> str:
    name = ("single_gpu" if total_gpus == 1 else "multi_gpu") if option == "zero0" else option
    return f"launch/accelerate/{name}.yaml"


def profile_of(stage: str) -> str:
    """The memory profile of a registry stage: sft (one sequence), rm (pairs, scalar head), dpo (pairs + reference)."""
    from stages import registry

    profile = registry.get(stage).plan_profile
    if profile is None:
        planned = [n for n, s in registry.STAGES.items() if s.plan_profile]
        raise ConfigError(f"--stage: {stage} has no memory model; one of {', '.join(planned)}")
    return profile


def plan(model: str, *, gpus: int, gpu_mem_gib: float, method: str, nodes: int = 1, stage: str = "sft",
         seq_len: int = 2048, batch: int = 1, checkpointing: bool = True, lora_r: int = 16,
         weights_dtype: str = "bf16", trust_remote_code: bool = False, shape: Shape | None = None) -> dict:
    """The estimate for each option and the launch config to pick (the fastest that fits)."""
    if method not in ("full", "lora", "qlora"):
        raise ConfigError(f"--method: full, lora or qlora, got {method!r}")
    stage = profile_of(stage)
    if gpus < 1 or nodes < 1 or gpu_mem_gib <= 0 or seq_len < 1 or batch < 1:
        raise ConfigError("--gpus, --nodes, --gpu-mem, --seq-len and --batch must be positive")
    shape = shape or model_shape(load_config(model, trust_remote_code), trust_remote_code)
    acts = activations(shape, seq_len=seq_len, batch=batch, checkpointing=checkpointing, stage=stage)
    wbytes = {"bf16": 2, "fp16": 2, "fp32": 4}[weights_dtype]
    rows = []
    for option in OPTIONS:
        states = model_states(shape, option, method=method, gpus_per_node=gpus, nodes=nodes, lora_r=lora_r,
                              weight_bytes=wbytes, stage=stage)
        if states is None:
            rows.append({"option": option, "supported": False})
            continue
        gpu = states[0] + acts + OVERHEAD
        rows.append({"option": option, "supported": True, "model_states_gib": states[0] / GiB,
                     "activations_gib": acts / GiB, "total_gib": gpu / GiB, "cpu_per_node_gib": states[1] / GiB,
                     "fits": gpu <= gpu_mem_gib * GiB, "config": launch_config(option, gpus * nodes)})
    pick = next((r for r in rows if r.get("fits")), None)
    return {"model": model, "method": method, "stage": stage, "gpus_per_node": gpus, "nodes": nodes,
            "gpu_mem_gib": gpu_mem_gib, "seq_len": seq_len, "micro_batch": batch,
            "gradient_checkpointing": checkpointing, "lora_r": lora_r, "shape": asdict(shape),
            "trainable_params": shape.total if method == "full" else shape.lora(lora_r),
            "options": rows, "pick": pick["option"] if pick else None, "config": pick["config"] if pick else None}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def render(p: dict) -> str:
    s = p["shape"]
    lines = [f"{p['model']}: {_count(s['total'])} params, {p['trainable_params']:,} trainable ({p['method']}); "
             f"{p['stage']}, micro-batch {p['micro_batch']} x {p['seq_len']} tokens, gradient checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}; {p['nodes']} node(s) x {p['gpus_per_node']} GPU(s) "
             f"of {p['gpu_mem_gib']:g} GiB", "",
             f"{'option':<15}{'states':>9}{'activ.':>9}{'per GPU':>10}{'CPU/node':>10}  fits",
             ]
    for r in p["options"]:
        if not r["supported"]:
            lines.append(f"{r['option']:<15}{'not supported with ' + p['method']:>38}")
            continue
        lines.append(f"{r['option']:<15}{r['model_states_gib']:>8.1f}G{r['activations_gib']:>8.1f}G"
                     f"{r['total_gib']:>9.1f}G{r['cpu_per_node_gib']:>9.1f}G  {'yes' if r['fits'] else 'no'}")
    lines.append("")
    if p["pick"] is None:
        lines.append("Nothing fits: try --method lora or qlora, more GPUs, gradient checkpointing, a shorter "
                     "--seq-len or a smaller --batch (raise gradient_accumulation_steps instead).")
        return "\n".join(lines)
    n = p["gpus_per_node"] * p["nodes"]
    script = {"sft": "sft", "rm": "rm", "dpo": "dpo"}[p["stage"]]
    lines.append(f"pick: {p['pick']} -> {p['config']}")
    if p["nodes"] > 1:
        lines.append(f"  ACCELERATE_CONFIG={p['config']} sbatch --nodes {p['nodes']} launch/slurm/multinode.sbatch "
                     f"stages/{script}.py --config RECIPE.yaml")
    else:
        lines.append(f"  accelerate launch --config_file {p['config']} --num_processes {n} stages/{script}.py "
                     "--config RECIPE.yaml")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hub id, model dir, config.json or built-in alias")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    ap.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    from stages import registry

    ap.add_argument("--stage", default="sft", choices=[n for n, s in registry.STAGES.items() if s.plan_profile])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="per-device micro-batch")
    ap.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--weights-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the estimate as JSON")
    a = ap.parse_args(argv)
    try:
        p = plan(a.model, gpus=a.gpus, gpu_mem_gib=a.gpu_mem, method=a.method, nodes=a.nodes, stage=a.stage,
                 seq_len=a.seq_len, batch=a.batch, checkpointing=a.checkpointing, lora_r=a.lora_r,
                 weights_dtype=a.weights_dtype, trust_remote_code=a.trust_remote_code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(p, indent=2) if a.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
