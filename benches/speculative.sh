#!/usr/bin/env bash
# Speculative greedy decoding with an n-gram draft against plain greedy decoding of the
# target, same process settings (float32, 2 threads), same machine, same run.
# The target is the character-level Llama of shared/fixtures/hf_tiny_llama (trained by
# PyTorch on the first 90% of Tiny Shakespeare with context 64; its config.json says
# 2048, so a copy says 64 and decoding slides a window of recent characters instead of
# running past the positions it was trained on); the draft is a modified Kneser-Ney
# n-gram model counted over the target tokenizer's ids on that same 90%
# (`nlp ngram train -t fixture/tokenizer.json`). For each of 4 prompts from the
# validation part (the last 10%) and each draft length k it prints the acceptance rate,
# tokens/s of both (the best of REPEATS runs each, interleaved, so a busy machine
# slows both alike), the speed-up and whether the ids are identical (they must be:
# greedy speculative decoding is exact). No Python: nothing to compare against but
# the target itself.
# Usage: bash benches/speculative.sh [ORDER (4)] [REPEATS (5)]
source "$(dirname "$0")/common.sh"

ORDER="${1:-4}"
REPEATS="${2:-5}"
build_nlp
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
TARGET="$OUT/spec-target"
mkdir -p "$TARGET"
cp "$SHARED"/fixtures/hf_tiny_llama/{model.safetensors,tokenizer.json} "$TARGET"/
sed 's/"max_position_embeddings": 2048/"max_position_embeddings": 64/' \
  "$SHARED/fixtures/hf_tiny_llama/config.json" > "$TARGET/config.json"
TEXT="$SHARED/data/tinyshakespeare.txt"
BYTES="$(wc -c < "$TEXT")"
TRAIN_BYTES=$((BYTES * 9 / 10))
head -c "$TRAIN_BYTES" "$TEXT" > "$OUT/spec-train.txt"
DRAFT="$OUT/spec-draft-$ORDER.bin"
"$NLP" -q ngram train --order "$ORDER" -t "$TARGET/tokenizer.json" "$OUT/spec-train.txt" -o "$DRAFT" > /dev/null

json_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.readline())['$1'])"; }
# The best tokens/s of REPEATS runs of `nlp --json generate ARGS`, and the last run's JSON.
best_of() {
  local best=0 out
  for _ in $(seq "$REPEATS"); do
    out="$("$NLP" --json generate -m "$TARGET" --greedy --max-new-tokens 200 "$@")"
    best="$(awk -v a="$(echo "$out" | json_field tokens_per_s)" -v b="$best" 'BEGIN { print (a > b) ? a : b }')"
  done
  echo "$best $(echo "$out" | python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(','.join(map(str,d['ids'])), d.get('acceptance_rate', ''))")"
}

printf '%-8s %3s %10s %12s %12s %8s %9s\n' prompt k acceptance 'spec tok/s' 'plain tok/s' speed-up identical
declare -A sum_speedup count
for p in 0 1 2 3; do
  # The first 32 characters of the first whole, non-empty line past a point of the
  # validation part.
  prompt="$(python3 - "$TEXT" "$((TRAIN_BYTES + 20000 * p + 1000))" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()[int(sys.argv[2]):].decode("utf-8", "ignore")
print(next(line for line in data.split("\n")[1:] if line.strip())[:32])
PY
)"
  read -r plain_speed plain_ids _ <<< "$(best_of --prompt "$prompt")"
  for k in 2 3 4 6; do
    read -r spec_speed spec_ids acceptance <<< "$(best_of --prompt "$prompt" --draft "$DRAFT" --draft-k "$k")"
    same="$( [ "$spec_ids" = "$plain_ids" ] && echo yes || echo no)"
    speedup="$(ratio "$spec_speed" "$plain_speed")"
    printf '%-8s %3s %10.2f %12.1f %12.1f %8s %9s\n' "$p" "$k" "$acceptance" "$spec_speed" "$plain_speed" "$speedup" "$same"
    sum_speedup[$k]="$(awk -v a="${sum_speedup[$k]:-0}" -v b="$speedup" 'BEGIN { print a + b }')"
    count[$k]=$(( ${count[$k]:-0} + 1 ))
  done
done
for k in 2 3 4 6; do
  printf 'k=%s: mean speed-up over the prompts %.2f\n' "$k" "$(awk -v s="${sum_speedup[$k]}" -v n="${count[$k]}" 'BEGIN { print s / n }')"
done
