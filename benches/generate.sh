#!/usr/bin/env bash
# nlp generate beside transformers' generate, same weights, same machine, same run
# (float32, 2 threads each). Prints tokens/s and time to first token with ratios:
#   1. greedy decoding of 256 tokens (target: nlp >= 2x transformers' tokens/s);
#   2. time to first token after a 512-token prompt (target: nlp <= transformers), from
#      fresh processes and warm (repeated prefills in one process, as transformers is timed);
#   3. beam search with 4 beams, 128 tokens (target: nlp >= 2x tokens/s);
#   4. speculative greedy decoding with a small draft of the same tokenizer against
#      plain greedy decoding of the target: identical output, speed-up printed.
# The target is a random-init Llama (vocab 32000, hidden 512, intermediate 1376, 8
# layers, 8 heads) saved by transformers with a 32000-token BPE tokenizer trained by
# `nlp bpe train`. The draft shares the target's embeddings, first 2 layers, final norm
# and head (a LayerSkip-style early-exit draft, Elhoushi et al. 2024): on random
# weights nothing else agrees with the target often enough to be a useful draft.
# Usage: bash benches/generate.sh
source "$(dirname "$0")/common.sh"

build_nlp
# The CPU-only wheel; where that index is unreachable, PyPI's (larger) wheel.
python_env --index-url https://download.pytorch.org/whl/cpu torch || python_env torch
python_env transformers safetensors
PY="$VENV/bin/python"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
MODEL="$OUT/gen-llama"
DRAFT="$OUT/gen-llama-draft"

if [ ! -s "$MODEL/tokenizer.json" ]; then
  mkdir -p "$MODEL"
  "$NLP" -q bpe train --vocab-size 32000 "$SHARED/data/tinyshakespeare.txt" \
    "$SHARED/data/wikitext2.valid.txt" -o "$OUT/gen-tokenizer.json"
  cat > "$OUT/gen_make.py" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
torch.manual_seed(0)
tok_file, out, draft_out = sys.argv[1:4]
def config(layers):
    return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, tie_word_embeddings=False)
model = LlamaForCausalLM(config(8)).eval()
tokenizer = PreTrainedTokenizerFast(tokenizer_file=tok_file)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
draft = LlamaForCausalLM(config(2)).eval()
state = {k: v for k, v in model.state_dict().items()
         if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
draft.load_state_dict(state)
draft.save_pretrained(draft_out)
tokenizer.save_pretrained(draft_out)
PY
  "$PY" "$OUT/gen_make.py" "$OUT/gen-tokenizer.json" "$MODEL" "$DRAFT"
fi

# Prompts as ids: 16 tokens for decoding, 512 for time to first token.
cat > "$OUT/gen_ref.py" <<'PY'
import json, sys, time, torch
from transformers import LlamaForCausalLM
torch.set_num_threads(2)
model_dir, draft_dir, task, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = torch.tensor([[(7 * i + 11) % 32000 for i in range(n)]])
def run(**kw):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
if task == "greedy":
    run(max_new_tokens=8)
    t = time.perf_counter(); out = run(max_new_tokens=256, min_new_tokens=256); s = time.perf_counter() - t
    print(json.dumps({"tokens_per_s": 256 / s, "ids": out[0, n:].tolist()}))
elif task == "ttft":
    run(max_new_tokens=1)
    best = min((lambda t: (run(max_new_tokens=1), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
    print(json.dumps({"seconds": best}))
elif task == "beam":
    run(max_new_tokens=4, num_beams=4)
    t = time.perf_counter(); out = run(max_new_tokens=128, min_new_tokens=128, num_beams=4, length_penalty=1.0); s = time.perf_counter() - t
    print(json.dumps({"tokens_per_s": 128 / s, "ids": out[0, n:].tolist()}))
PY
prompt_ids() { "$PY" -c "print(','.join(str((7 * i + 11) % 32000) for i in range($1)))"; }
P16="$(prompt_ids 16)"
P512="$(prompt_ids 512)"
field() { "$PY" -c "import json,sys; print(json.loads(sys.stdin.readline())['$1'])"; }

row() { printf '%-34s %12s %12s %8s\n' "$@"; }
row task nlp transformers ratio

ref="$("$PY" "$OUT/gen_ref.py" "$MODEL" "$DRAFT" greedy 16)"
ours="$("$NLP" --json generate -m "$MODEL" --prompt-ids "$P16" --greedy --max-new-tokens 256)"
a="$(echo "$ours" | field tokens_per_s)"; b="$(echo "$ref" | field tokens_per_s)"
row "greedy 256 tokens (tokens/s)" "$(printf %.1f "$a")" "$(printf %.1f "$b")" "$(ratio "$a" "$b")"
same="$( [ "$(echo "$ours" | field ids)" = "$(echo "$ref" | field ids)" ] && echo yes || echo no)"
echo "  greedy ids identical: $same"

ref="$("$PY" "$OUT/gen_ref.py" "$MODEL" "$DRAFT" ttft 512)"
best=""
for _ in 1 2 3 4 5; do
  s="$("$NLP" --json generate -m "$MODEL" --prompt-ids "$P512" --greedy --max-new-tokens 1 | field seconds)"
  best="$(awk -v a="$s" -v b="${best:-1e9}" 'BEGIN { print (a < b) ? a : b }')"
done
b="$(echo "$ref" | field seconds)"
row "TTFT, 512-token prompt (ms)" "$(awk -v s="$best" 'BEGIN{printf "%.1f", s*1000}')" "$(awk -v s="$b" 'BEGIN{printf "%.1f", s*1000}')" "$(ratio "$best" "$b")"
# transformers' figure is the best of 5 after a warm-up run in one process; the row
# above is the best of 5 fresh nlp processes (the first forward pass of each). Warm
# like transformers': the best of 5 prefills after a warm-up in one nlp process
# (`eval --efficiency`).
warm="$("$NLP" --json eval --efficiency -m "$MODEL" --prompt-tokens 512 --gen-tokens 1 --repeats 5 \
  | "$PY" -c "import json,sys; print(json.load(sys.stdin)['efficiency']['time_to_first_token_seconds']['min'])")"
row "  same, warm: best of 5 (ms)" "$(awk -v s="$warm" 'BEGIN{printf "%.1f", s*1000}')" "$(awk -v s="$b" 'BEGIN{printf "%.1f", s*1000}')" "$(ratio "$warm" "$b")"

ref="$("$PY" "$OUT/gen_ref.py" "$MODEL" "$DRAFT" beam 16)"
ours="$("$NLP" --json generate -m "$MODEL" --prompt-ids "$P16" --beam 4 --length-penalty 1.0 --max-new-tokens 128)"
a="$(echo "$ours" | field new_tokens)"; s="$(echo "$ours" | field seconds)"
a="$(awk -v n="$a" -v s="$s" 'BEGIN { print n / s }')"; b="$(echo "$ref" | field tokens_per_s)"
row "beam 4, 128 tokens (tokens/s)" "$(printf %.1f "$a")" "$(printf %.1f "$b")" "$(ratio "$a" "$b")"
same="$( [ "$(echo "$ours" | field ids)" = "$(echo "$ref" | field ids)" ] && echo yes || echo no)"
echo "  beam ids identical: $same"

echo
plain="$("$NLP" --json generate -m "$MODEL" --prompt-ids "$P16" --greedy --max-new-tokens 256)"
for k in 2 4; do
  spec="$("$NLP" --json generate -m "$MODEL" --draft "$DRAFT" --draft-k "$k" --prompt-ids "$P16" --greedy --max-new-tokens 256)"
  same="$( [ "$(echo "$spec" | field ids)" = "$(echo "$plain" | field ids)" ] && echo yes || echo no)"
  a="$(echo "$spec" | field tokens_per_s)"; b="$(echo "$plain" | field tokens_per_s)"
  printf 'speculative k=%s: %.1f tokens/s vs plain %.1f: speed-up %s, acceptance %.2f, identical output: %s\n' \
    "$k" "$a" "$b" "$(ratio "$a" "$b")" "$(echo "$spec" | field acceptance_rate)" "$same"
done
