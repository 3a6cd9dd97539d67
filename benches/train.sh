#!/usr/bin/env bash
# nlp train beside PyTorch (benches/train_ref.py: the same Llama-style architecture and
# recipe) on the same thread count and the same cores.
#
#   benches/train.sh            # 2000 steps of configs/shakespeare-char.toml + the large config
#   benches/train.sh --quick    # 200 steps, and 5 steps of the large config
#
# Each round runs the shakespeare-char pair twice: both in f32, then both in mixed
# precision (nlp's train.precision = "bf16-mixed", PyTorch's bf16 autocast).
# Environment: ROUNDS (default 1) runs that many rounds, nlp and PyTorch alternating,
# and prints each round's ratios and their medians: on a shared machine the load
# shifts between two runs, and alternating rounds spread that over both tools. THREADS (default 1) sets RAYON_NUM_THREADS for nlp (candle's matmuls
# and our kernels use rayon's pool) and torch.set_num_threads for PyTorch; both are
# pinned (taskset) to the first THREADS cores when the machine has more.
# Prints validation loss and training tokens/s (evaluation excluded) of both, the
# tokens/s ratio, and for dim 384 / 6 layers / 6 heads / seq 256 / batch 16 also peak
# resident memory (/usr/bin/time's maximum RSS).
source "$(dirname "$0")/common.sh"

STEPS=2000
LARGE_STEPS=20
if [ "${1:-}" = "--quick" ]; then
  STEPS=200
  LARGE_STEPS=5
fi
THREADS="${THREADS:-1}"
ROUNDS="${ROUNDS:-1}"
CORPUS="$SHARED/data/tinyshakespeare.txt"

# As common.sh's `measure`, printing "seconds peak_kib user_seconds system_seconds".
measure_cpu() {
  /usr/bin/time -f "%e %M %U %S" -o "$OUT/time.txt" "$@" > "$OUT/last.log" 2>&1 || {
    echo "benchmark command failed: $*" >&2
    tail -5 "$OUT/last.log" >&2
    return 1
  }
  cat "$OUT/time.txt"
}

build_nlp
python_env torch numpy
PY="$VENV/bin/python"

# Both tools run on the same cores, the first $THREADS: PyTorch keeps helper threads
# beside the ones torch.set_num_threads counts, which would otherwise take another core.
pin=()
if command -v taskset > /dev/null && [ "$THREADS" -lt "$(nproc)" ]; then
  pin=(taskset -c "0-$((THREADS - 1))")
fi

# nlp train with the shakespeare-char config, extra arguments first (--set ...); the
# output folder is $OUT/train-run.
nlp_train=("${pin[@]}" env RAYON_NUM_THREADS="$THREADS" "$NLP" --json -q --config "$ROOT/configs/shakespeare-char.toml")

json_field() { # field, file (one JSON document, or JSON lines: the last one)
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
text = open(sys.argv[2]).read().strip()
try:
    doc = json.loads(text)
except ValueError:
    doc = json.loads(text.splitlines()[-1])
print(doc[sys.argv[1]])
PYEOF
}

echo "== shakespeare-char: dim 128, 4 layers, 4 heads, hidden 352, seq 64, batch 12, $STEPS steps, $THREADS thread(s), $ROUNDS round(s)"
# CPU seconds (user + system) of a whole run, start-up and evaluation included: on a
# shared machine the wall-clock tokens/s swings with the load, this far less.
cpu_seconds() { awk '{ print $3 + $4 }' "$1"; }
tokens=$((STEPS * 12 * 64))

# One round of the pair in one precision: nlp with train.precision=$1, PyTorch with the
# flags after it (--bf16: autocast to bf16). Prints both and sets $pair_ratio.
pair_round() {
  local precision="$1"
  shift
  rm -rf "$OUT/train-run"
  measure_cpu "${nlp_train[@]}" --set "train.steps=$STEPS" --set "train.precision=\"$precision\"" \
    train "$CORPUS" -o "$OUT/train-run" > "$OUT/time-nlp-small.txt"
  cp "$OUT/last.log" "$OUT/nlp-small.json"
  measure_cpu "${pin[@]}" "$PY" "$ROOT/benches/train_ref.py" --corpus "$CORPUS" --steps "$STEPS" \
    --threads "$THREADS" "$@" > "$OUT/time-torch-small.txt"
  cp "$OUT/last.log" "$OUT/torch-small.json"
  local nlp_cpu torch_cpu nlp_val nlp_tps torch_val torch_tps
  nlp_cpu=$(cpu_seconds "$OUT/time-nlp-small.txt")
  torch_cpu=$(cpu_seconds "$OUT/time-torch-small.txt")
  nlp_val=$(json_field final_val_loss "$OUT/nlp-small.json")
  nlp_tps=$(json_field tokens_per_s "$OUT/nlp-small.json")
  torch_val=$(json_field val_loss "$OUT/torch-small.json")
  torch_tps=$(json_field tokens_per_s "$OUT/torch-small.json")
  printf "%-8s %-10s val loss %.4f  train tokens/s %8.0f\n" nlp "$precision" "$nlp_val" "$nlp_tps" \
    PyTorch "$([ $# -gt 0 ] && echo autocast || echo f32)" "$torch_val" "$torch_tps"
  pair_ratio=$(ratio "$nlp_tps" "$torch_tps")
  echo "tokens/s ratio nlp/PyTorch: $pair_ratio"
  printf "whole run, tokens per CPU second: nlp %.0f, PyTorch %.0f, ratio %s\n" \
    "$(ratio "$tokens" "$nlp_cpu")" "$(ratio "$tokens" "$torch_cpu")" "$(ratio "$torch_cpu" "$nlp_cpu")"
}

# Each round: both in f32, then both in mixed precision (nlp's bf16-mixed, PyTorch's
# autocast), then nlp's bf16-mixed against PyTorch's faster run of the two.
f32_ratios=()
bf16_ratios=()
best_ratios=()
for round in $(seq "$ROUNDS"); do
  echo "-- round $round"
  pair_round f32
  f32_ratios+=("$pair_ratio")
  torch_f32_tps=$(json_field tokens_per_s "$OUT/torch-small.json")
  pair_round bf16-mixed --bf16
  bf16_ratios+=("$pair_ratio")
  torch_best=$(json_field tokens_per_s "$OUT/torch-small.json")
  torch_best=$(awk -v a="$torch_best" -v b="$torch_f32_tps" 'BEGIN { print (a > b ? a : b) }')
  best_ratios+=("$(ratio "$(json_field tokens_per_s "$OUT/nlp-small.json")" "$torch_best")")
  echo "nlp bf16-mixed against PyTorch's faster precision: ${best_ratios[-1]}"
done
if [ "$ROUNDS" -gt 1 ]; then
  echo "f32 tokens/s ratios by round: ${f32_ratios[*]}; median $(median "${f32_ratios[@]}")"
  echo "bf16-mixed vs autocast ratios by round: ${bf16_ratios[*]}; median $(median "${bf16_ratios[@]}")"
  echo "bf16-mixed vs PyTorch's faster precision: ${best_ratios[*]}; median $(median "${best_ratios[@]}")"
fi

echo "== large: dim 384, 6 layers, 6 heads, hidden 1024, seq 256, batch 16, $LARGE_STEPS steps"
large=(--set model.dim=384 --set model.n_layers=6 --set model.n_heads=6 --set model.hidden=1024
  --set train.seq_len=256 --set train.batch_size=16 --set "train.steps=$LARGE_STEPS"
  --set train.warmup_steps=2 --set train.eval_steps=1 --set train.checkpoint_every=0)
# In f32, then in mixed precision (nlp's bf16-mixed, PyTorch's autocast).
for precision in f32 bf16-mixed; do
  torch_flags=()
  [ "$precision" = f32 ] || torch_flags=(--bf16)
  rm -rf "$OUT/train-run"
  read -r _ nlp_kib < <(measure "${nlp_train[@]}" "${large[@]}" --set "train.precision=\"$precision\"" \
    train "$CORPUS" -o "$OUT/train-run")
  cp "$OUT/last.log" "$OUT/nlp-large.json"
  read -r _ torch_kib < <(measure "${pin[@]}" "$PY" "$ROOT/benches/train_ref.py" --corpus "$CORPUS" \
    --dim 384 --layers 6 --heads 6 --hidden 1024 --seq-len 256 --batch 16 \
    --steps "$LARGE_STEPS" --warmup 2 --eval-batches 1 --threads "$THREADS" "${torch_flags[@]}")
  cp "$OUT/last.log" "$OUT/torch-large.json"
  nlp_tps=$(json_field tokens_per_s "$OUT/nlp-large.json")
  torch_tps=$(json_field tokens_per_s "$OUT/torch-large.json")
  printf "%-8s %-10s train tokens/s %8.0f  peak memory %6.0f MiB\n" \
    nlp "$precision" "$nlp_tps" "$((nlp_kib / 1024))" PyTorch "$([ "$precision" = f32 ] && echo f32 || echo autocast)" "$torch_tps" "$((torch_kib / 1024))"
  echo "tokens/s ratio nlp/PyTorch: $(ratio "$nlp_tps" "$torch_tps"); peak memory ratio: $(ratio "$nlp_kib" "$torch_kib")"
done
