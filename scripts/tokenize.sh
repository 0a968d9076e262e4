#!/usr/bin/env bash
# tokenize.sh — run build/mt-tokenize (byte-level tokenizer) from anywhere, building it if missing.
#   scripts/tokenize.sh INPUT.txt OUTPUT.tok [--bytes-per-token 2|4]
# Arguments pass through unchanged (paths are relative to the caller's directory).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/build/mt-tokenize"
if [ ! -x "$bin" ]; then
  make -C "$root" build/mt-tokenize >&2
fi
exec "$bin" "$@"
