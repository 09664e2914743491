"""What never reaches a written file: values of secret-looking keys and flags, credentials in URLs, tokens.

Used for the manifest's recorded command, chain output, logs, reports and model cards. A key is secret
when it ends in "token" (hub_token, access_token, token) or names a key/secret/password/credential anywhere;
the tokenizer's special tokens and metric names (kl_per_token, num_tokens, mean_token_accuracy) are not.
"""
from __future__ import annotations

import re

SECRET = re.compile(r"(^|_)(hub|access|auth|api|hf|bearer|refresh|session|github|gh|wandb|private|secret|user)?_?token$"
                    r"|secret|password|passwd|api_?key|credential|private_key", re.I)
METRIC = re.compile(r"(per|mean|num|avg|total|max|min)_token$", re.I)  # kl_per_token, num_token: figures, not secrets
NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token",
              "num_virtual_tokens", "max_new_tokens", "trust_remote_code"}
MASK = "***"
# user:password@ in URLs; Hugging Face, OpenAI-style and generic bearer tokens
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_TOKENS = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bsk-[A-Za-z0-9_-]{20,}|(?i:bearer\s+)[A-Za-z0-9._~+/=-]{16,}")


def is_secret(key) -> bool:
    key = str(key).lstrip("-").replace("-", "_")
    return key not in NOT_SECRET and not METRIC.search(key) and bool(SECRET.search(key))


def redact_text(text: str) -> str:
    """Credentials in URLs and token-looking strings masked."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + MASK + "@", str(text))
    return _TOKENS.sub(MASK, text)


def scrub(obj):
    """A copy without any secret-named key, with every string redacted."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not is_secret(k)}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def scrub_argv(argv: list[str]) -> list[str]:
    """Mask the values of secret-looking flags (`--hub_token X`, `--api-key=X`) and token-like strings."""
    out, mask_next = [], False
    for word in argv:
        word = str(word)
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        name, eq, _ = word.partition("=")
        if word.startswith("-") and is_secret(name):
            out.append(f"{name}={MASK}" if eq else word)
            mask_next = not eq
            continue
        out.append(redact_text(word))
    return out


def scrub_command(cmd: str) -> str:
    return " ".join(scrub_argv(str(cmd).split()))
