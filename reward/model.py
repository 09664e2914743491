"""Load a reward model (full or PEFT SEQ_CLS adapter) and score (prompt, response) pairs in batches.

Loading fails loudly (ModelError) when the value head would be freshly initialised: the classic
"`score.weight` newly initialized" bug that silently turns a reward model into noise.
Truncation rule (shared by every stage, `stages.core.encode.fit_prompt_response`): keep the response,
trim the prompt from its start, against the reward model's training `max_length` (from its manifest)
so that scoring sees sequences shaped like the ones the model was trained on.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from stages.core.errors import ModelError

from .rules import as_messages

HEAD_NAMES = ("score", "classifier", "v_head")


def _is_head_key(key: str) -> bool:
    parts = key.split(".")
    return any(h in parts for h in HEAD_NAMES) and not any(p.startswith("lora_") for p in parts)


class RewardModel:
    """A sequence-classification reward model (num_labels=1) + its tokenizer; `.score()` is batched and padding-safe."""

    def __init__(self, model, tokenizer, device=None, *, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.truncated = 0  # pairs truncated so far (prompt trimmed from its start)
        self._head = _find_head(model)

    # -- public API -------------------------------------------------------------------------------
    def score(self, prompts, responses, *, batch_size: int | None = None, max_length: int | None = None) -> list[float]:
        """Scores for (prompt, response) pairs; prompt: str or messages, response: str or assistant messages."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        convs = [as_messages(p) + as_messages(r, role="assistant") for p, r in zip(prompts, responses)]
        return self.score_messages(convs, batch_size=batch_size, max_length=max_length)

    def score_messages(self, conversations, *, batch_size: int | None = None, max_length: int | None = None) -> list[float]:
        """Scores for whole conversations (message lists ending with the assistant reply)."""
        limit = max_length or self.max_length or self._default_max_length()
        ids = [self._encode(c, limit) for c in conversations]
        return self.score_ids(ids, batch_size=batch_size or self.batch_size)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]], *, batch_size: int = 8) -> list[float]:
        """Scores for pre-tokenized sequences (longest first for tight batches; original order returned)."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                for i, v in zip(idx, self._forward([ids[i] for i in idx])):
                    out[i] = v
        finally:
            self.model.train(was_training)
        return out

    # -- internals --------------------------------------------------------------------------------
    def _default_max_length(self) -> int:
        cands = [getattr(self.tokenizer, "model_max_length", None),
                 getattr(self.model.config.get_text_config(), "max_position_embeddings", None)]
        cands = [c for c in cands if isinstance(c, int) and 0 < c < 10**7]
        return min(cands) if cands else 2048

    def _encode(self, conversation, limit: int) -> list[int]:
        from stages.core.encode import fit_prompt_response

        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError("the reward model's tokenizer has no chat template")
        conversation = list(conversation)
        ids = list(self._template(conversation))
        if not ids:
            raise ModelError("a conversation rendered to zero tokens")
        if len(ids) > limit:
            start = self._response_start(conversation, ids)
            prompt, response, _ = fit_prompt_response(ids[:start], ids[start:], limit)
            self.truncated += 1
            ids = prompt + response
        return ids

    def _template(self, messages, **kw) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    def _response_start(self, conversation, ids: list[int]) -> int:
        """Index of the final assistant reply's first token (the end when there is none)."""
        if not conversation or conversation[-1].get("role") != "assistant":
            return len(ids)
        if len(conversation) == 1:
            return 0
        head = list(self._template(conversation[:-1], add_generation_prompt=True))
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        return n

    def _forward(self, batch: list[list[int]]) -> list[float]:
        pad = self.tokenizer.pad_token_id
        width, left = max(map(len, batch)), self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, seq in enumerate(batch):
            sl = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[r, sl] = torch.tensor(seq)
            mask[r, sl] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        last = (torch.arange(width) * mask).argmax(-1)  # index of the last real token per row
        captured = {}
        hook = self._head.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o)) if self._head else None
        try:
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=position_ids.to(self.device))
        finally:
            if hook is not None:
                hook.remove()
        per_token = captured.get("x")
        if isinstance(per_token, torch.Tensor) and per_token.dim() == 3:
            shift = per_token.shape[1] - width  # prompt-tuning adapters prepend virtual tokens
            vals = per_token[torch.arange(len(batch)), (last + shift).to(per_token.device), 0]
        else:
            vals = out.logits[:, 0]
        return vals.float().cpu().tolist()


def _find_head(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _prepare_tokenizer(tok, model):
    try:
        from stages.core.models import prepare_tokenizer
    except ImportError:
        prepare_tokenizer = None
    if prepare_tokenizer is not None:
        prepare_tokenizer(tok, model=model)
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if "<|pad|>" in tok.get_vocab():
            tok.pad_token = "<|pad|>"
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.pad_token_id = tok.pad_token_id  # sequence classification finds the last token with it
    return tok


def _load_tokenizer(*candidates, trust_remote_code=False):
    from transformers import AutoTokenizer

    errors = []
    for c in candidates:
        try:
            return AutoTokenizer.from_pretrained(c, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{c}: {e}")
    raise ModelError("could not load the reward model's tokenizer: " + "; ".join(errors))


def _load_full(path: str, dtype, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification

    from stages.core.models import resolve_model

    resolved = resolve_model(path)
    try:
        with _quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                resolved, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load reward model '{path}': {e}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if _is_head_key(k))
    if missing:
        raise ModelError(f"{path}: reward head weight(s) {', '.join(missing)} missing from the checkpoint and would be "
                         "newly initialised (is this a causal LM rather than a trained reward model?)")
    if model.config.num_labels != 1:
        raise ModelError(f"{path}: a reward model has num_labels=1, this one has {model.config.num_labels}")
    return model, resolved


def _adapter_head_tensors(path: Path) -> dict:
    f = path / "adapter_model.safetensors"
    if f.is_file():
        from safetensors.torch import load_file

        sd = load_file(str(f))
    elif (path / "adapter_model.bin").is_file():
        sd = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelError(f"{path}: adapter_config.json but no adapter_model.safetensors")
    return {k: v for k, v in sd.items() if _is_head_key(k)}


def _load_adapter(path: str, acfg: dict, dtype, trust_remote_code: bool):
    from peft import PeftModel, get_peft_model_state_dict

    from stages.core import policy

    task = str(acfg.get("task_type") or "").upper()
    if task != "SEQ_CLS":
        raise ModelError(f"{path}: adapter task_type is {task or 'unset'}, a reward model adapter has SEQ_CLS")
    head = _adapter_head_tensors(Path(path))
    if not head:
        raise ModelError(f"{path}: the adapter holds no reward head weights (score/classifier in modules_to_save); "
                         "loading it would leave the head newly initialised. Retrain with modules_to_save=['score']")
    base_name = acfg.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{path}/adapter_config.json: no base_model_name_or_path")
    with _quiet_transformers():  # the base has no head yet: its "newly initialized" notice is expected
        base, _, _ = policy.load_model(base_name, task="seq_cls", num_labels=1, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
    policy._match_vocab(base, path)
    model = PeftModel.from_pretrained(base, path)
    loaded = get_peft_model_state_dict(model)
    for key, want in head.items():
        got = loaded.get(key)
        if got is None or got.shape != want.shape or not torch.equal(got.detach().cpu().to(want.dtype), want):
            raise ModelError(f"{path}: reward head weight '{key}' did not load into the model")
    if str(acfg.get("peft_type", "")).upper() in policy.MERGEABLE:
        model = model.merge_and_unload()
    return model, base_name


def trained_max_length(path) -> int | None:
    """The `max_length` the reward model was trained with (its stage manifest), None when unknown."""
    from stages.core.artifacts import read_manifest

    m = read_manifest(path) if Path(str(path)).is_dir() else None
    v = (((m or {}).get("config") or {}).get("training") or {}).get("max_length")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def load_reward_model(path, *, dtype=torch.float32, device=None, trust_remote_code: bool = False,
                      batch_size: int = 8, max_length: int | None = None) -> RewardModel:
    """Load a full or PEFT (SEQ_CLS) reward model dir; ModelError if its head would be newly initialised.

    `max_length` defaults to the training max_length in the dir's manifest.json, else the tokenizer's
    model_max_length / the model's context."""
    from stages.core import policy

    path = str(path)
    acfg = policy.adapter_config(path) if Path(path).is_dir() else None
    if acfg is None:
        model, source = _load_full(path, dtype, trust_remote_code)
        tok = _load_tokenizer(source, trust_remote_code=trust_remote_code)
    else:
        model, base = _load_adapter(path, acfg, dtype, trust_remote_code)
        tok = _load_tokenizer(path, base, trust_remote_code=trust_remote_code)
    _prepare_tokenizer(tok, model)
    if max_length is None:
        max_length = trained_max_length(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RewardModel(model, tok, device, batch_size=batch_size, max_length=max_length)
