#!/usr/bin/env bash
# LoRA against full fine-tuning, the issue's two measurements:
#  1. Memory and speed: LoRA r=8 on q/k/v/o of the configs/small.toml model vs a full
#     fine-tune of the same model on the same data (Tiny Shakespeare). Peak memory is
#     the process's VmHWM (what `nlp lora train --json` reports); seconds per step
#     exclude evaluation. The base only needs small.toml's shapes, so it is the model
#     after SMALL_BASE_STEPS steps of `nlp train` (hours on a CPU for all 5000).
#  2. Quality: a Tiny Shakespeare model fine-tuned with LoRA on the first half of
#     ptb.valid.txt, perplexity on the second half, before and after (see below).
#  With CHECKPOINT=true both runs of measurement 1 recompute each block in the backward
#  pass (train.checkpoint_activations) instead of keeping its activations.
# Usage: bash benches/lora.sh   (env: PTB_STEPS, SPEED_STEPS, SPEED_BATCH, SPEED_SEQ,
#        CHECKPOINT, SMALL_BASE_STEPS override the defaults below)
source "$(dirname "$0")/common.sh"
build_nlp
L="$OUT/lora"
mkdir -p "$L"
PTB_STEPS="${PTB_STEPS:-150}"
SPEED_STEPS="${SPEED_STEPS:-4}"
SPEED_BATCH="${SPEED_BATCH:-1}"
SPEED_SEQ="${SPEED_SEQ:-64}"
CHECKPOINT="${CHECKPOINT:-false}"
SMALL_BASE_STEPS="${SMALL_BASE_STEPS:-1}"
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# 1. Memory and seconds per step on the small.toml model.
if [ ! -f "$L/small-base/model.safetensors" ]; then
  "$NLP" -q --config configs/small.toml --set train.batch_size=1 --set train.grad_accum=1 \
    train "$SHARED/data/tinyshakespeare.txt" --steps "$SMALL_BASE_STEPS" -o "$L/small-base" > /dev/null
fi
speed_flags=(--config configs/small.toml --set "train.batch_size=$SPEED_BATCH"
  --set train.grad_accum=1 --set "train.seq_len=$SPEED_SEQ" --set train.eval_steps=1
  --set train.eval_every=0 --set train.checkpoint_every=0
  --set "train.checkpoint_activations=$CHECKPOINT")
for mode in lora full; do
  rm -rf "$L/small-$mode"
  extra=(--rank 8 --alpha 16 --target q_proj,k_proj,v_proj,o_proj)
  [ "$mode" = full ] && extra=(--full)
  "$NLP" -q --json "${speed_flags[@]}" lora train --base "$L/small-base" \
    --data "$SHARED/data/tinyshakespeare.txt" -o "$L/small-$mode" --steps "$SPEED_STEPS" \
    "${extra[@]}" > "$L/small-$mode.json"
done
lora_mem=$(field "$L/small-lora.json" peak_memory_bytes)
full_mem=$(field "$L/small-full.json" peak_memory_bytes)
lora_sps=$(field "$L/small-lora.json" seconds_per_step)
full_sps=$(field "$L/small-full.json" seconds_per_step)
echo "## small.toml model, batch $SPEED_BATCH x $SPEED_SEQ, $SPEED_STEPS steps, checkpointed activations: $CHECKPOINT"
echo "| | trainable | peak memory (MiB) | s/step |"
echo "| --- | --- | --- | --- |"
for mode in lora full; do
  printf '| %s | %s (%.2f%%) | %.1f | %.3f |\n' "$mode" \
    "$(field "$L/small-$mode.json" trainable_parameters)" \
    "$(field "$L/small-$mode.json" trainable_percent)" \
    "$(awk -v b="$(field "$L/small-$mode.json" peak_memory_bytes)" 'BEGIN{print b/1048576}')" \
    "$(field "$L/small-$mode.json" seconds_per_step)"
done
echo "LoRA peak memory / full: $(ratio "$lora_mem" "$full_mem") (target <= 0.40)"
echo "full s/step / LoRA s/step: $(ratio "$full_sps" "$lora_sps") (target >= 1.5)"

# 2. A Tiny Shakespeare model fine-tuned on PTB: the shared hf_tiny_llama fixture (a
# character-level Llama trained on Tiny Shakespeare, 2000 steps, by PyTorch). Its 65
# characters lack some of PTB's, so PTB is mapped into them: `<unk>` becomes `unk` and
# the remaining out-of-vocabulary characters (digits, '#', '\\', '*', '/': about 160 of
# 400k) are dropped. First half trains, second half validates (train.val_fraction=0.5).
BASE="$SHARED/fixtures/hf_tiny_llama"
python3 - "$BASE/vocab.json" "$SHARED/data/ptb.valid.txt" "$L/ptb-in-vocab.txt" <<'PY'
import json, sys
vocab = set(json.load(open(sys.argv[1])))
text = open(sys.argv[2]).read().replace("<unk>", "unk")
open(sys.argv[3], "w").write("".join(ch for ch in text if ch in vocab))
PY
rm -rf "$L/ptb-lora"
"$NLP" -q --json --config configs/shakespeare-char.toml --set train.val_fraction=0.5 \
  --set train.warmup_steps=10 --set train.eval_every=50 --set train.eval_steps=20 \
  --set train.checkpoint_every=0 \
  lora train --base "$BASE" --data "$L/ptb-in-vocab.txt" -o "$L/ptb-lora" \
  --rank 8 --alpha 16 --dropout 0.05 --target q_proj,k_proj,v_proj,o_proj \
  --steps "$PTB_STEPS" --lr 3e-3 > "$L/ptb-lora.json"
before=$(field "$L/ptb-lora.json" initial_val_ppl)
after=$(field "$L/ptb-lora.json" final_val_ppl)
echo "## Tiny Shakespeare char model + LoRA r=8 q/k/v/o on PTB, $PTB_STEPS steps"
printf 'trainable: %s (%.2f%%, target < 5%%)\n' "$(field "$L/ptb-lora.json" trainable_parameters)" \
  "$(field "$L/ptb-lora.json" trainable_percent)"
printf 'PTB validation perplexity per character: %.3f -> %.3f (%.1f%% lower, target >= 30%%)\n' \
  "$before" "$after" "$(awk -v a="$before" -v b="$after" 'BEGIN{print 100*(1-b/a)}')"
