#!/usr/bin/env bash
# nlp eval --perplexity beside the `transformers` strided perplexity recipe (the
# "Perplexity of fixed-length models" guide), same weights, same token ids, float32,
# 2 threads each, in the same run.
#
# Two models:
#   1. the hf_tiny_llama fixture (char-level, 4 layers, hidden 128) on the validation
#      part of tinyshakespeare;
#   2. a random-init Llama saved by transformers (vocab 32000, hidden 512, intermediate
#      1376, 8 layers, 8 heads) with a byte-level BPE tokenizer from `nlp bpe train`.
# Both tools read the same ids (written by Python with the model's tokenizer), so
# tokenization is outside the timing. Each is timed over its scoring alone, the model
# loaded: transformers over its window loop, nlp by the `seconds` its report gives.
# The last column is nlp's whole command, process start and loading included.
# Usage: bash benches/eval.sh [TOKENS] [CONTEXT] [STRIDE]   (default 8192 1024 512)
# Environment: ROUNDS (default 1) runs each model's pair that many times, transformers
# and nlp alternating, one row per round, then each model's median ratio: on a shared
# machine one pair of runs can swing by 20% either way.
source "$(dirname "$0")/common.sh"

tokens="${1:-8192}"
context="${2:-1024}"
stride="${3:-512}"
ROUNDS="${ROUNDS:-1}"
dir="$OUT/eval"
mkdir -p "$dir"

build_nlp
# The CPU build of torch; where its index cannot be reached, PyPI's build (which runs
# on the CPU as well).
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" 2> /dev/null; }; then
  python_env torch --index-url https://download.pytorch.org/whl/cpu || python_env torch
fi
python_env transformers tokenizers safetensors

# The validation part of tinyshakespeare (its last 10%), as the fixture was validated.
text="$dir/valid.txt"
lines=$(wc -l < "$SHARED/data/tinyshakespeare.txt")
tail -n $((lines / 10)) "$SHARED/data/tinyshakespeare.txt" > "$text"

# A random Llama and a BPE tokenizer for it.
random="$dir/llama-random"
if [ ! -s "$random/model.safetensors" ]; then
  "$NLP" -q bpe train --vocab-size 8000 "$SHARED/data/tinyshakespeare.txt" -o "$dir/tokenizer.json"
  "$VENV/bin/python" - "$random" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                     max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
                     pad_token_id=None, tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)
PY
  cp "$dir/tokenizer.json" "$random/tokenizer.json"
fi

fixture="$SHARED/fixtures/hf_tiny_llama"
printf '%-16s %8s %8s %12s %12s %12s %12s %8s %14s\n' model tokens context nlp_nll hf_nll nlp_tok/s hf_tok/s ratio nlp_cmd_tok/s
for model in "$fixture" "$random"; do
  name="$(basename "$model")"
  ids="$dir/$name.ids"
  # One line of ids: the first $tokens tokens of the text, by the model's own tokenizer.
  "$VENV/bin/python" - "$model" "$text" "$tokens" "$ids" <<'PY'
import json, sys
model, text, n, out = sys.argv[1], open(sys.argv[2], encoding="utf-8").read(), int(sys.argv[3]), sys.argv[4]
try:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(f"{model}/tokenizer.json").encode(text).ids
except Exception:
    vocab = json.load(open(f"{model}/vocab.json"))
    index = {c: i for i, c in enumerate(vocab)} if isinstance(vocab, list) else vocab
    ids = [index[c] for c in text]
open(out, "w").write(" ".join(map(str, ids[:n])) + "\n")
PY
  ratios=()
  for round in $(seq "$ROUNDS"); do
    # Command substitution waits for Python to exit, so that its shutdown does not run
    # beside nlp's timed scoring.
    hf=$("$VENV/bin/python" - "$model" "$ids" "$context" "$stride" <<'PY'
import sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model_dir, ids_path, max_length, stride = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = torch.tensor([[int(t) for t in open(ids_path).read().split()]])
seq_len = ids.size(1)
# The strided recipe of the transformers perplexity guide.
started = time.perf_counter()
nll_sum, n_tokens, prev_end = 0.0, 0, 0
for begin in range(0, seq_len, stride):
    end = min(begin + max_length, seq_len)
    trg_len = end - prev_end
    input_ids = ids[:, begin:end]
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
        loss = model(input_ids, labels=target_ids).loss
    scored = int((target_ids[:, 1:] != -100).sum())  # the labels left after the shift
    nll_sum += loss.item() * scored
    n_tokens += scored
    prev_end = end
    if end == seq_len:
        break
seconds = time.perf_counter() - started
print(f"{nll_sum / n_tokens:.6f} {n_tokens / seconds:.1f}")
PY
    )
    read -r hf_nll hf_tps <<< "$hf"
    started=$(date +%s.%N)
    report=$(RAYON_NUM_THREADS=2 "$NLP" --json eval --perplexity -m "$model" --ids "$ids" --context "$context" --stride "$stride")
    finished=$(date +%s.%N)
    read -r nlp_tokens nlp_nll nlp_tps < <(echo "$report" | "$VENV/bin/python" -c 'import json,sys; r=json.load(sys.stdin); print(r["tokens"], "%.6f" % r["mean_nll"], "%.1f" % r["tokens_per_s"])')
    command_tps=$(awk -v n="$nlp_tokens" -v a="$started" -v b="$finished" 'BEGIN { printf "%.1f", n / (b - a) }')
    ratios+=("$(ratio "$nlp_tps" "$hf_tps")")
    printf '%-16s %8s %8s %12s %12s %12s %12s %8s %14s\n' "$name" "$nlp_tokens" "$context/$stride" "$nlp_nll" "$hf_nll" "$nlp_tps" "$hf_tps" "${ratios[-1]}" "$command_tps"
  done
  if [ "$ROUNDS" -gt 1 ]; then
    echo "$name: tokens/s ratios by round: ${ratios[*]}; median $(median "${ratios[@]}")"
  fi
done
