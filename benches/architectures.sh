#!/usr/bin/env bash
# The course's architecture comparison (lecture 5): configs/llama.toml (pre-norm RMSNorm,
# RoPE, SwiGLU) against configs/vaswani.toml (post-norm LayerNorm, sinusoidal positions,
# ReLU) at the same size, on the same data, seed and schedule. Prints their validation
# losses side by side at every evaluation step (from each run's metrics.jsonl).
# Usage: bash benches/architectures.sh [STEPS]   (default: the configs' 2000)
source "$(dirname "$0")/common.sh"
build_nlp
A="$OUT/architectures"
mkdir -p "$A"
steps=()
[ $# -gt 0 ] && steps=(--steps "$1")
for arch in llama vaswani; do
  rm -rf "$A/$arch"
  "$NLP" -q --config "configs/$arch.toml" train "${steps[@]}" -o "$A/$arch" > /dev/null
done
python3 - "$A" <<'PY'
import json, sys
root = sys.argv[1]
def val(arch):
    rows = [json.loads(line) for line in open(f"{root}/{arch}/metrics.jsonl")]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
llama, vaswani = val("llama"), val("vaswani")
print("| step | llama.toml val loss | vaswani.toml val loss |")
print("| --- | --- | --- |")
for step in sorted(set(llama) & set(vaswani)):
    print(f"| {step} | {llama[step]:.4f} | {vaswani[step]:.4f} |")
PY
