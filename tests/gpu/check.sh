#!/usr/bin/env bash
# GPU check (issue 17, item 4): the GPU paths the CPU suite tests only up to the GPU boundary, one table.
# CI never runs this. It has NOT yet run on a GPU (the session that wrote it was lent none).
#
# Checks (tests/gpu/check.py): CUDA bf16 SFT stage (tiny llama, then a SmolLM2-135M-shaped random model),
# padding-free loss = padded loss under SDPA (and flash_attention_2 where flash_attn is installed), TRL's
# fused LM head = plain log-softmax, the compact CPU head stepping aside on CUDA, a PPO stage update,
# QLoRA 4-bit peak GPU memory < LoRA (bitsandbytes), DeepSpeed ZeRO-3 with one process (torchrun).
# Budget: at most 5 minutes on one GPU (enforced below). Exit status 1 if any row is FAIL; a missing
# optional package is "skipped: not installed", no CUDA is "skipped: no CUDA".
#
# How a session with a GPU runs it (the `device` tool, see its README):
#   1. Here, in the root of the checkout the session was started in (the one the device tool sends):
#        tests/gpu/check.sh --fetch-wheels
#      It downloads the wheels the bare, offline GPU image lacks (trl, peft, accelerate, datasets and
#      their dill/multiprocess, bitsandbytes, deepspeed built from its sdist plus hjson/pydantic) at the
#      versions of this machine's .venv into .whl/ (ignored by .gitignore), and prints their
#      size: wheels plus working tree must stay under 64 MiB (about 50 MiB as written). The image's own
#      torch 2.11 and transformers 5.17 are used; to carry others add NAME==VERSION arguments, and
#      `--skip NAME` drops one (e.g. `--skip bitsandbytes` frees 41 MiB, for a newer pyarrow, say).
#   2. The device tool's run, with carry [".whl"] and timeout_s 420:
#        PYTHONUNBUFFERED=1 bash tests/gpu/check.sh
#      The table comes back at the end of output_tail and as $OUT/gpu-check.md (+ .json, and the full
#      log as $OUT/gpu-check.log). Put the figures in the README ("Tests", the "GPU check" paragraph).
#
# Here, without a GPU:  tests/gpu/check.sh --cpu-dry-run   (the same code on CPU, CUDA-only rows skipped;
# tests/test_gpu_check_script.py runs it in the fast tier).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

fetch_wheels() {
    local skip=() extra=()
    while (($#)); do
        if [[ $1 == --skip ]]; then skip+=("$2"); shift 2; else extra+=("$1"); shift; fi
    done
    mkdir -p .whl
    git check-ignore -q .whl || echo '/.whl/' >>"$(git rev-parse --git-common-dir)/info/exclude"  # .gitignore has it
    local names=(trl peft accelerate datasets dill multiprocess bitsandbytes hjson pydantic pydantic-core
                 annotated-types typing-inspection)
    local pins=()
    for name in "${names[@]}"; do
        [[ " ${skip[*]-} " == *" $name "* ]] && continue
        pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    pins+=("${extra[@]}")
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
    echo "downloading: ${pins[*]}"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${pins[@]}"
    if [[ " ${skip[*]-} " != *" deepspeed "* ]]; then
        # DeepSpeed ships only an sdist; with DS_BUILD_OPS=0 it builds a pure-Python wheel (ops JIT-compile there).
        local ds
        ds=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
        ls .whl/deepspeed-"$ds"-*.whl >/dev/null 2>&1 ||
            DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ds"
    fi
    local wheels tree
    wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s}')
    ls -la .whl
    awk -v w="$wheels" -v t="$tree" 'BEGIN {printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB)\n",
        w / 2^20, t / 2^20, (w + t) / 2^20; exit (w + t > 63 * 2^20)}' ||
        { echo "over budget: drop one with --skip NAME (and delete its wheel from .whl/)" >&2; exit 2; }
}

case "${1-}" in
    --fetch-wheels) shift; fetch_wheels "$@"; exit 0 ;;
    --cpu-dry-run) exec "$PYTHON" tests/gpu/check.py "$@" ;;
esac

OUT=${OUT:-$(mktemp -d)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # the carried wheels; tests point this elsewhere
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
work=$(mktemp -d /tmp/gpu-check-XXXXXX)
status=0
timeout 300 "$PYTHON" tests/gpu/check.py --json "$OUT/gpu-check.json" --table "$OUT/gpu-check.md" \
    --work-dir "$work" "$@" >"$OUT/gpu-check.log" 2>&1 || status=$?
[[ -f $work/zero3.log ]] && cp "$work/zero3.log" "$OUT/zero3.log"
grep -v '^|' "$OUT/gpu-check.log" | tail -c 5000
echo
cat "$OUT/gpu-check.md"
[[ $status == 124 ]] && echo "gpu check: stopped at its 5-minute limit (rows above are those finished)" >&2
exit "$status"
