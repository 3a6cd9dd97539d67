#!/usr/bin/env bash
# nlp bpe beside Hugging Face tokenizers, SentencePiece and tiktoken, same machine,
# same run. Prints wall time, peak memory and ratios:
#   1. byte-level BPE, vocab 32k: training time/memory, merges equal?, bytes per
#      token on held-out text (tokenizers vs nlp);
#   2. encoding MB/s on one thread (tokenizers, tiktoken with our exported ranks,
#      nlp) and nlp on all cores;
#   3. Unigram, vocab 8k: training time/memory and held-out bytes per token
#      (SentencePiece, tokenizers, nlp).
# Usage: bash benches/bpe.sh [--quick]   (--quick: the 5 MB corpus only)
source "$(dirname "$0")/common.sh"

quick=false
[ "${1:-}" = "--quick" ] && quick=true

build_nlp
python_env tokenizers==0.23.* sentencepiece tiktoken
PY="$VENV/bin/python"
shakespeare="$(shakespeare_corpus)"
corpora=("$shakespeare")
$quick || corpora+=("$(big_corpus)")
heldout="$OUT/heldout.txt"
# PTB and WikiText spell unknown words `<unk>` (15,203 times here). A `tokenizer.json`
# with an `<unk>` special token (ours, or `tokenizers`') matches that text as one
# token, while SentencePiece spells it in four pieces: 9% of all tokens, and nothing
# to do with compression. The held-out text writes them `unk`.
cat "$SHARED/data/wikitext2.valid.txt" "$SHARED/data/ptb.valid.txt" | sed 's/<unk>/unk/g' > "$heldout"

row() { printf '%-12s %-34s %12s %12s %8s\n' "$@"; }
row corpus task nlp reference ratio

cat > "$OUT/hf_bpe.py" <<'PY'
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              special_tokens=["<|endoftext|>"], show_progress=False)
tok.train([sys.argv[1]], trainer)
tok.save(sys.argv[3])
PY
cat > "$OUT/bytes_per_token.py" <<'PY'
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
lines = open(sys.argv[2], encoding="utf-8").read().splitlines()
tokens = sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))
print(f"{sum(len(l.encode()) for l in lines) / tokens:.4f}")
PY
cat > "$OUT/same_merges.py" <<'PY'
import json, sys
a, b = (json.load(open(p))["model"] for p in sys.argv[1:3])
norm = lambda ms: [m if isinstance(m, str) else " ".join(m) for m in ms]
print("yes" if norm(a["merges"]) == norm(b["merges"]) and a["vocab"] == b["vocab"] else "no")
PY

for corpus in "${corpora[@]}"; do
  name="$(basename "$corpus" .txt)"
  read -r h_s h_kib < <(measure "$PY" "$OUT/hf_bpe.py" "$corpus" 32000 "$OUT/$name.hf32k.json")
  read -r n_s n_kib < <(measure "$NLP" -q bpe train --vocab-size 32000 --special-tokens '<|endoftext|>' "$corpus" -o "$OUT/$name.nlp32k.json")
  row "$name" "BPE 32k train wall (s)" "$n_s" "$h_s" "$(ratio "$n_s" "$h_s")"
  row "$name" "BPE 32k train peak (MB)" "$((n_kib / 1024))" "$((h_kib / 1024))" "$(ratio "$n_kib" "$h_kib")"
  row "$name" "BPE 32k merges equal to tokenizers'" "$("$PY" "$OUT/same_merges.py" "$OUT/$name.nlp32k.json" "$OUT/$name.hf32k.json")" "" ""
  n_bpt=$("$PY" "$OUT/bytes_per_token.py" "$OUT/$name.nlp32k.json" "$heldout")
  h_bpt=$("$PY" "$OUT/bytes_per_token.py" "$OUT/$name.hf32k.json" "$heldout")
  row "$name" "BPE 32k held-out bytes/token" "$n_bpt" "$h_bpt" "$(ratio "$n_bpt" "$h_bpt")"
done

# Encoding speed with the 32k tokenizer trained on the complete Shakespeare, over
# the same 5 MB of text, one thread each (tiktoken gets our exported ranks).
tok="$OUT/shakespeare.nlp32k.json"
"$NLP" -q bpe export -t "$tok" -o "$OUT/shakespeare.tiktoken"
mb=$(awk -v b="$(stat -c %s "$shakespeare")" 'BEGIN { printf "%.3f", b / 1e6 }')
cat > "$OUT/encode_ref.py" <<'PY'
import base64, os, sys, time
which, tok_path, ranks_path, text_path = sys.argv[1:5]
lines = open(text_path, encoding="utf-8").read().splitlines()
if which == "tokenizers":
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    encode = lambda line: tok.encode(line, add_special_tokens=False).ids
else:
    import tiktoken
    ranks = {base64.b64decode(t): int(r) for t, r in (l.split() for l in open(ranks_path))}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("bench", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    encode = enc.encode_ordinary
start = time.perf_counter()
for line in lines:
    encode(line)
print(f"{time.perf_counter() - start:.3f}")
PY
h_s=$(TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 "$PY" "$OUT/encode_ref.py" tokenizers "$tok" - "$shakespeare")
t_s=$("$PY" "$OUT/encode_ref.py" tiktoken - "$OUT/shakespeare.tiktoken" "$shakespeare")
read -r n1_s _ < <(RAYON_NUM_THREADS=1 measure "$NLP" bpe encode -t "$tok" "$shakespeare")
read -r nn_s _ < <(measure "$NLP" bpe encode -t "$tok" "$shakespeare")
speed() { awk -v mb="$mb" -v s="$1" 'BEGIN { printf "%.1f", mb / s }'; }
row shakespeare "encode MB/s, 1 thread vs tokenizers" "$(speed "$n1_s")" "$(speed "$h_s")" "$(ratio "$h_s" "$n1_s")"
row shakespeare "encode MB/s, 1 thread vs tiktoken" "$(speed "$n1_s")" "$(speed "$t_s")" "$(ratio "$t_s" "$n1_s")"
row shakespeare "encode MB/s, $(nproc) threads vs tiktoken" "$(speed "$nn_s")" "$(speed "$t_s")" "$(ratio "$t_s" "$nn_s")"

# Unigram, vocab 8k.
cat > "$OUT/spm_train.py" <<'PY'
import sys, sentencepiece as spm
spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=8000, model_type="unigram",
                               num_threads=2, minloglevel=2, input_sentence_size=0, train_extremely_large_corpus=False)
PY
cat > "$OUT/spm_bpt.py" <<'PY'
import sys, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
lines = open(sys.argv[2], encoding="utf-8").read().splitlines()
tokens = sum(len(ids) for ids in sp.encode(lines))
print(f"{sum(len(l.encode()) for l in lines) / tokens:.4f}")
PY
cat > "$OUT/hf_unigram.py" <<'PY'
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
tok = Tokenizer(models.Unigram())
tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.decoder = decoders.Metaspace()
trainer = trainers.UnigramTrainer(vocab_size=8000, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False)
tok.train([sys.argv[1]], trainer)
tok.save(sys.argv[2])
PY
for corpus in "${corpora[@]}"; do
  name="$(basename "$corpus" .txt)"
  read -r s_s s_kib < <(measure "$PY" "$OUT/spm_train.py" "$corpus" "$OUT/$name.spm8k")
  read -r n_s n_kib < <(measure "$NLP" -q bpe train --model unigram --vocab-size 8000 "$corpus" -o "$OUT/$name.nlpuni8k.json")
  row "$name" "Unigram 8k train wall (s) vs spm" "$n_s" "$s_s" "$(ratio "$n_s" "$s_s")"
  row "$name" "Unigram 8k train peak (MB) vs spm" "$((n_kib / 1024))" "$((s_kib / 1024))" "$(ratio "$n_kib" "$s_kib")"
  if [ "$name" = shakespeare ]; then
    read -r h_s h_kib < <(measure "$PY" "$OUT/hf_unigram.py" "$corpus" "$OUT/$name.hfuni8k.json")
    row "$name" "Unigram 8k train wall (s) vs tokenizers" "$n_s" "$h_s" "$(ratio "$n_s" "$h_s")"
    row "$name" "Unigram 8k train peak (MB) vs tokenizers" "$((n_kib / 1024))" "$((h_kib / 1024))" "$(ratio "$n_kib" "$h_kib")"
  fi
  n_bpt=$("$PY" "$OUT/bytes_per_token.py" "$OUT/$name.nlpuni8k.json" "$heldout")
  s_bpt=$("$PY" "$OUT/spm_bpt.py" "$OUT/$name.spm8k.model" "$heldout")
  row "$name" "Unigram 8k held-out bytes/token" "$n_bpt" "$s_bpt" "$(ratio "$n_bpt" "$s_bpt")"
done
