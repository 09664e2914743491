"""PPO rollout engines (stages/core/ppo/engines.py) up to the vLLM boundary.

vLLM itself is not importable in the suite's environment, so vLLM is replaced by fakes that do what its
documented API does: a fake `vllm.LLM` that loads the base directory it is given with transformers and
applies the LoRA adapter directory named in each `LoRARequest` with PEFT (so what the engine writes to
disk is what gets served), and a fake OpenAI-compatible server on a local socket.
"""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.core.ppo import engines as E

ROOT = Path(__file__).resolve().parents[1]
TINY_PPO = str(ROOT / "recipes/tiny/ppo.yaml")


# -- fakes of vLLM's documented API ------------------------------------------------------------------
class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class HFBackedLLM:
    """vllm.LLM's generate(prompts=[{"prompt_token_ids": ...}], sampling_params, lora_request) on transformers + PEFT."""

    instances: list = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs, self.calls, self.removed = dict(model=model, **kwargs), [], []
        self.base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.adapters = {}
        HFBackedLLM.instances.append(self)

    def remove_lora(self, lora_id):
        self.removed.append(lora_id)
        return True

    def _model(self, req):
        if req is None:
            return self.base
        from peft import PeftModel

        assert Path(req.lora_path, "adapter_config.json").is_file() and Path(req.lora_path, "adapter_model.safetensors").is_file()
        if req.lora_int_id not in self.adapters:
            import copy

            self.adapters[req.lora_int_id] = PeftModel.from_pretrained(copy.deepcopy(self.base), req.lora_path).eval()
        return self.adapters[req.lora_int_id]

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        p = sampling_params
        self.calls.append({"prompts": [list(x["prompt_token_ids"]) for x in prompts], "params": dict(p.__dict__),
                           "lora": None if lora_request is None else (lora_request.lora_name, lora_request.lora_int_id,
                                                                      lora_request.lora_path)})
        model, outs = self._model(lora_request), []
        for x in prompts:
            ids = torch.tensor([x["prompt_token_ids"]])
            kw = dict(do_sample=False) if p.temperature == 0 else dict(do_sample=True, temperature=p.temperature,
                                                                        top_p=p.top_p, top_k=max(p.top_k, 0))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                 eos_token_id=p.stop_token_ids, pad_token_id=p.stop_token_ids[0], **kw)[0, ids.shape[1]:].tolist()
            for i, t in enumerate(out):  # vLLM stops at the first stop token and includes it
                if t in p.stop_token_ids:
                    out = out[:i + 1]
                    break
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=out)]))
        return outs


FAKE_VLLM = SimpleNamespace(LLM=HFBackedLLM, SamplingParams=FakeSamplingParams, LoRARequest=FakeLoRARequest)


# -- sampling means the same on both engines -------------------------------------------------------------
def test_sampling_translates_to_vllm_and_openai_fields_with_every_knob_explicit():
    s = E.Sampling(max_new_tokens=12, eos=(2, 7), pad_id=0, do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    p = s.vllm_params()
    assert (p["max_tokens"], p["temperature"], p["top_p"], p["top_k"]) == (12, 0.7, 0.9, -1)  # top_k 0 = off = vLLM -1
    assert p["stop_token_ids"] == [2, 7] and p["ignore_eos"] is False and p["repetition_penalty"] == 1.0
    greedy = E.Sampling(max_new_tokens=4, eos=(2,), pad_id=0, do_sample=False, temperature=0.7, top_k=5).vllm_params()
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1  # greedy = temperature 0 in vLLM
    body = E.Sampling(max_new_tokens=5, eos=(2,), pad_id=0, top_k=3).openai_body("policy-v1", [[1, 2], [3]])
    assert body["model"] == "policy-v1" and body["prompt"] == [[1, 2], [3]] and body["top_k"] == 3
    assert body["stop_token_ids"] == [2] and body["max_tokens"] == 5 and body["return_token_ids"] is True


def test_pad_right_matches_generate_layout():
    out = E.pad_right([[5, 6, 2], [], [7]], pad_id=0)
    assert out.tolist() == [[5, 6, 2], [0, 0, 0], [7, 0, 0]]
    assert E.pad_right([[], []], pad_id=9).tolist() == [[9], [9]]


# -- which policies vLLM can serve ---------------------------------------------------------------------------
def _peft_roles(tiny_llama, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config, adapter_name="policy")
    return SimpleNamespace(mode="peft", actor_critic=SimpleNamespace(lm=lm))


def test_only_plain_lora_is_hot_swapped_and_everything_else_falls_back(tiny_llama):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert E.vllm_support(_peft_roles(tiny_llama, LoraConfig(**lora)), "colocate")[0] == "lora"
    assert E.vllm_support(_peft_roles(tiny_llama, LoraConfig(**lora)), "server")[0] == "lora"
    for config, word in ((LoraConfig(**lora, use_dora=True), "DoRA"), (LoraConfig(**lora, use_rslora=True), "rsLoRA"),
                         (LoraConfig(**lora, modules_to_save=["lm_head"]), "modules_to_save"),
                         (IA3Config(task_type="CAUSAL_LM"), "IA3"),
                         (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PROMPT_TUNING")):
        support, why = E.vllm_support(_peft_roles(tiny_llama, config), "colocate")
        assert support == "generate" and word in why, (word, why)
    full = SimpleNamespace(mode="full", actor_critic=SimpleNamespace(lm=None))
    assert E.vllm_support(full, "colocate")[0] == "full"
    assert E.vllm_support(full, "server")[0] == "generate"


def test_base_state_dict_is_the_plain_model_under_transformers_names(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), adapter_name="policy")
    sd = E.base_state_dict(lm)
    assert set(sd) == set(plain) and all(torch.equal(sd[k], plain[k]) for k in plain)


def test_adapter_store_writes_atomically_and_evicts_only_its_own_old_versions(tiny_llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False),
                        adapter_name="policy")
    lm.add_adapter("value", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    store = E.AdapterStore(tmp_path / "adapters")
    (tmp_path / "adapters" / "notes.txt").write_text("the user's")
    v0 = store.write(lm, 0)
    v1 = store.write(lm, 1)
    assert store.evict(keep=v1) == [v0] and not v0.exists()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["notes.txt", "v1"]  # no temp dirs left
    assert (v1 / "adapter_config.json").is_file() and not (v1 / "value").exists()  # the policy adapter only
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(v1))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        lm.set_adapter("policy")
        assert torch.allclose(reloaded(ids).logits, lm(ids).logits, atol=1e-6)


# -- colocated engine inside a PPO run ------------------------------------------------------------------------
@pytest.mark.slow
def test_ppo_with_the_colocated_engine_serves_each_adapter_version_and_matches_generate_greedy(tiny_llama, tmp_path, monkeypatch):
    """fp32: the first 16 greedy tokens the engine serves (base from disk + the adapter file it wrote) equal
    the policy's own generate, after each adapter swap; old versions are evicted from vLLM and disk."""
    from stages import ppo
    from stages.core.ppo import rollout as R

    monkeypatch.setattr(E, "_import_vllm", lambda: FAKE_VLLM)
    HFBackedLLM.instances.clear()
    compared, moved = [], []

    class CompareGreedy:
        def on_update_end(self, trainer, update, logs):
            ids = trainer.eval_ids[:4]
            batch, _, _, _ = trainer.sample(ids, do_sample=False)  # through the engine (swaps to this version)
            q, qm = R.left_pad(ids, trainer.pad_id, trainer.device)
            with trainer.generator("policy") as gen:
                own = R.generate(gen, q, qm, eos=trainer.eos, pad_id=trainer.pad_id, max_new_tokens=16, do_sample=False)
            own = R.cut_at_eos(own, trainer.eos, trainer.pad_id)[0]
            with trainer.generator("reference") as gen:
                base = R.generate(gen, q, qm, eos=trainer.eos, pad_id=trainer.pad_id, max_new_tokens=16, do_sample=False)
            base = R.cut_at_eos(base, trainer.eos, trainer.pad_id)[0]
            width = max(batch["response"].shape[1], own.shape[1], base.shape[1])
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=trainer.pad_id)  # noqa: E731
            compared.append((update, torch.equal(pad(batch["response"]), pad(own))))
            moved.append(not torch.equal(pad(own), pad(base)))

    out = tmp_path / "ppo"
    ppo.main(["--config", TINY_PPO, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out),
              "--reward", '{"regex": "e"}', "--use_vllm", "true", "--vllm_mode", "colocate", "--max_steps", "2",
              "--max_new_tokens", "16", "--bf16", "false", "--max_eval_rows", "4"], callbacks=[CompareGreedy()])
    assert compared == [(1, True), (2, True)]
    assert any(moved)  # the trained adapter changed greedy replies: serving the bare base would have failed above
    llm = HFBackedLLM.instances[-1]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["model"] == str(tiny_llama)
    served = [c["lora"] for c in llm.calls]
    assert served[0] is None  # the start evaluation: the reference = the base without adapter
    versions = [(name, lid) for name, lid, _ in (s for s in served if s)]
    assert versions[0] == ("policy-v0", 1) and ("policy-v2", 3) in versions
    assert llm.removed == [1, 2]  # each swap evicts the previous version from vLLM
    sampled = [c["params"] for c in llm.calls if c["params"]["temperature"] != 0]
    assert sampled and all(p["temperature"] == 1.0 and p["max_tokens"] == 16 for p in sampled)
    m = json.loads((out / "manifest.json").read_text())
    assert m["rollout_engine"] == "vllm-colocate"


@pytest.mark.slow
def test_a_dora_policy_falls_back_to_generate_with_a_log_line(tiny_llama, tmp_path, monkeypatch, capsys):
    from stages import ppo

    monkeypatch.setattr(E, "_import_vllm", lambda: pytest.fail("vLLM must not be started for a DoRA policy"))
    out = tmp_path / "ppo"
    ppo.main(["--config", TINY_PPO, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out),
              "--reward", '{"regex": "e"}', "--use_vllm", "true", "--peft_method", "dora", "--max_steps", "1",
              "--max_eval_rows", "2"])
    assert "rollout engine: generate (fallback from vLLM: a DoRA policy adapter" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["rollout_engine"] == "generate"


def test_vllm_keys_are_checked(tiny_llama, tmp_path, capsys):
    from stages import ppo

    code = ppo.cli(["--config", TINY_PPO, "--model_name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "p"),
                    "--reward", "demo_verifier", "--use_vllm", "true", "--vllm_mode", "remote"])
    assert code == 2 and "vllm_mode: must be colocate or server" in capsys.readouterr().err


# -- server engine ---------------------------------------------------------------------------------------------
class FakeOpenAIServer:
    """/v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter and /v1/completions (token ids back)."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append(("GET", self.path, None))
                self._send({"data": [{"id": "base"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(("POST", self.path, body))
                if self.path == "/v1/completions":
                    self._send({"choices": [{"index": i, "text": "", "token_ids": [len(p), 2]}
                                            for i, p in enumerate(body["prompt"])]})
                else:
                    self._send({})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_engine_loads_each_adapter_version_unloads_the_old_and_asks_for_token_ids(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                        LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"), adapter_name="policy")
    server = FakeOpenAIServer()
    try:
        engine = E.VLLMServer(server.url, base_dir=str(tiny_llama), support="lora", store=E.AdapterStore(tmp_path / "a"),
                              fallback=E.GenerateEngine(), log=print, timeout=5)
        s = E.Sampling(max_new_tokens=4, eos=(2,), pad_id=0, do_sample=False)
        q = torch.zeros(2, 3, dtype=torch.long)
        ref = engine.generate(lm, q, q, [[1, 2, 3], [4]], s, role="reference", version=0)
        assert ref.tolist() == [[3, 2], [1, 2]]
        engine.generate(lm, q, q, [[1, 2, 3], [4]], s, role="policy", version=0)
        engine.generate(lm, q, q, [[5]], s, role="policy", version=1)
        engine.close()
    finally:
        server.stop()
    posts = [(path, body) for method, path, body in server.requests if method == "POST"]
    completions = [b for p, b in posts if p == "/v1/completions"]
    assert [b["model"] for b in completions] == ["base", "policy-v0", "policy-v1"]
    assert completions[0]["prompt"] == [[1, 2, 3], [4]] and completions[0]["temperature"] == 0.0
    assert completions[0]["stop_token_ids"] == [2] and completions[0]["max_tokens"] == 4
    lora = [(p, b["lora_name"]) for p, b in posts if "lora" in p]
    assert lora == [("/v1/load_lora_adapter", "policy-v0"), ("/v1/load_lora_adapter", "policy-v1"),
                    ("/v1/unload_lora_adapter", "policy-v0")]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["v1"]


def test_a_server_that_hangs_gives_one_clear_error_within_the_timeout():
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts connections, never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(E.RolloutServerError, match="did not become ready within 1 s"):
            E.VLLMServer(f"http://127.0.0.1:{hung.getsockname()[1]}", base_dir="x", support="lora", store=None,
                         fallback=None, log=print, timeout=1)
        assert time.monotonic() - t0 < 15
    finally:
        hung.close()


def test_a_server_killed_mid_run_gives_one_clear_error(tiny_llama, tmp_path):
    server = FakeOpenAIServer()
    engine = E.VLLMServer(server.url, base_dir="x", support="lora", store=None, fallback=None, log=print, timeout=2)
    server.stop()  # killed after start-up
    s = E.Sampling(max_new_tokens=4, eos=(2,), pad_id=0)
    q = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(E.RolloutServerError, match="did not answer within 2 s .*Is it still running"):
        engine.generate(None, q, q, [[1]], s, role="reference", version=0)


def test_ppo_stage_with_an_unreachable_server_exits_2_and_writes_no_output(tiny_llama, tmp_path, capsys):
    from stages import ppo

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ppo"
    code = ppo.cli(["--config", TINY_PPO, "--model_name_or_path", str(tiny_llama), "--output_dir", str(out),
                    "--reward", '{"regex": "e"}', "--use_vllm", "true", "--vllm_mode", "server",
                    "--vllm_server_base_url", f"http://127.0.0.1:{port}", "--vllm_server_timeout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "rollout server" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("executable,form", [("vllm", ["vllm", "serve", "BASE"]),
                                             ("/env/bin/python -m vllm.entrypoints.openai.api_server",
                                              ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "BASE"])])
def test_a_started_server_gets_lora_flags_and_its_early_exit_is_one_clear_error(monkeypatch, tmp_path, executable, form):
    started = {}

    class ExitedAtOnce:
        returncode = 1

        def __init__(self, cmd, env, stdout, stderr):
            started.update(cmd=cmd, env=env)

        def poll(self):
            return 1

    monkeypatch.setattr(E.subprocess, "Popen", ExitedAtOnce)
    with pytest.raises(E.RolloutServerError, match=r"exited with code 1 before answering.*vllm_server.log"):
        E.VLLMServer(None, base_dir="BASE", support="lora", store=None, fallback=None, log=print, timeout=5,
                     executable=executable, port=8123, max_lora_rank=16, log_file=tmp_path / "vllm_server.log")
    cmd = started["cmd"]
    assert cmd[:len(form)] == form and cmd[cmd.index("--port") + 1] == "8123"
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert started["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_weights_loaded_from_a_checkpoint_are_synced_again_under_a_fresh_adapter_id():
    """After the trainer loads other weights at the same update count (best-by-gold restore, resume), the
    next policy rollout must sync them: vLLM caches adapters by id, so the id must be new too."""
    import torch

    from stages.core.ppo import engines

    synced = []

    class Recorder(engines._VLLMEngine):
        def _sync(self, lm, version):
            synced.append(version)
            self.version = version

        def _complete(self, prompt_ids, sampling, use_adapter):
            return [[7] for _ in prompt_ids]

    engine = Recorder("lora", None, engines.GenerateEngine(), print)
    sampling = engines.Sampling(max_new_tokens=1, eos=(2,), pad_id=0)
    query = torch.ones(1, 3, dtype=torch.long)
    for _ in range(2):
        engine.generate(None, query, query, [[1, 1, 1]], sampling, version=30)
    assert synced == [30]  # same weights: one sync
    engine.invalidate()
    engine.generate(None, query, query, [[1, 1, 1]], sampling, version=30)
    assert len(synced) == 2 and synced[1] != 30
