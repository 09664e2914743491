"""Tiny random models and a locally trained tokenizer for CPU tests (no Hub access needed)."""
from __future__ import annotations

import string
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello there! The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer in lowercase. List three colours: red, green, blue.",
    "user assistant system Hi Acme Support Best regards",
    string.ascii_letters + string.digits + string.punctuation,
] * 20


def build_tokenizer(vocab_size: int = 400, *, pad_equals_eos: bool = False, with_template: bool = True):
    """A byte-level BPE tokenizer with ChatML special tokens, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_equals_eos else "<|pad|>",
    )
    if with_template:
        fast.chat_template = CHATML
    return fast


def build_model(arch: str = "llama", vocab_size: int = 400, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised causal LM of the given architecture (llama, qwen2, gpt2)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"unknown arch {arch}")
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny(out_dir: str | Path, arch: str = "llama", **kw) -> Path:
    """Write a tiny model + tokenizer directory (safetensors) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = build_model(arch, vocab_size=len(tok), **kw)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
