#!/usr/bin/env bash
# nlp ngram beside KenLM on the same machine, in the same run.
#
# Builds KenLM's lmplz/query/build_binary from the source in the PyPI package
# `kenlm` (and installs the Python module `kenlm` into bench-out/venv), then:
#   1. order-5 modified Kneser-Ney on the complete Shakespeare (5 MB) and on a
#      ~100 MB corpus: wall time and peak memory, lmplz -S 1G vs nlp --memory 1G;
#   2. the largest difference between the two ARPA files (log10);
#   3. query throughput on one core from each tool's binary format.
# The ~100 MB corpus repeats its texts, so its counts-of-counts have holes where lmplz
# stops with "bad discount": lmplz runs with --discount_fallback (its fixed discounts
# where the estimate fails; no effect elsewhere), as nlp falls back on its own.
# Usage: bash benches/ngram.sh [--quick]   (--quick: the 5 MB corpus only)
source "$(dirname "$0")/common.sh"

quick=false
[ "${1:-}" = "--quick" ] && quick=true

build_nlp
bin="$(kenlm_binaries)"
python_env kenlm==0.3.0
corpora=("$(shakespeare_corpus)")
$quick || corpora+=("$(big_corpus)")

printf '%-16s %-28s %10s %10s %8s\n' corpus task nlp kenlm ratio
for corpus in "${corpora[@]}"; do
  name="$(basename "$corpus" .txt)"
  read -r k_s k_kib < <(measure "$bin/lmplz" -o 5 -S 1G -T "$OUT" --skip_symbols --discount_fallback --text "$corpus" --arpa "$OUT/$name.kenlm.arpa")
  read -r n_s n_kib < <(measure "$NLP" -q ngram train --order 5 --memory 1G --skip-symbols "$corpus" -o "$OUT/$name.nlp.arpa")
  printf '%-16s %-28s %10s %10s %8s\n' "$name" "train o5 wall (s)" "$n_s" "$k_s" "$(ratio "$n_s" "$k_s")"
  printf '%-16s %-28s %10s %10s %8s\n' "$name" "train o5 peak (MB)" "$((n_kib / 1024))" "$((k_kib / 1024))" "$(ratio "$n_kib" "$k_kib")"

  # Largest log10 difference over the n-grams both files hold, and whether the
  # n-gram sets are equal.
  "$VENV/bin/python" - "$OUT/$name.nlp.arpa" "$OUT/$name.kenlm.arpa" <<'PY'
import sys
def read(path):
    table = {}
    order = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("\\") and line.endswith("-grams:"):
                order = int(line[1:line.index("-")])
                continue
            if not order or not line or line.startswith("\\"):
                continue
            fields = line.split("\t")
            backoff = float(fields[2]) if len(fields) > 2 else 0.0
            table[fields[1]] = (float(fields[0]), backoff)
    return table
ours, theirs = read(sys.argv[1]), read(sys.argv[2])
common = ours.keys() & theirs.keys()
worst = max((max(abs(ours[k][0] - theirs[k][0]), abs(ours[k][1] - theirs[k][1])) for k in common), default=0.0)
print(f"  n-grams: nlp {len(ours)}, kenlm {len(theirs)}, only in one: {len(ours.keys() ^ theirs.keys())}; max |log10 diff| {worst:.2e}")
PY

  # Query throughput on one core, from each tool's binary format.
  "$bin/build_binary" -q 8 -b 8 probing "$OUT/$name.kenlm.arpa" "$OUT/$name.kenlm.binary" > /dev/null 2>&1 \
    || "$bin/build_binary" probing "$OUT/$name.kenlm.arpa" "$OUT/$name.kenlm.binary" > /dev/null
  "$NLP" -q ngram convert "$OUT/$name.nlp.arpa" -o "$OUT/$name.nlp.bin" > /dev/null
  tokens=$("$NLP" --json ngram query -m "$OUT/$name.nlp.bin" "$corpus" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')
  read -r nq_s _ < <(measure taskset -c 0 "$NLP" ngram query -m "$OUT/$name.nlp.bin" "$corpus")
  read -r kq_s _ < <(measure taskset -c 0 sh -c "'$bin/query' -v summary '$OUT/$name.kenlm.binary' < '$corpus'")
  read -r kp_s _ < <(measure taskset -c 0 "$VENV/bin/python" -c "
import kenlm, sys
m = kenlm.Model(sys.argv[1])
with open(sys.argv[2], encoding='utf-8', errors='replace') as f:
    total = sum(m.score(line.rstrip('\n')) for line in f)
" "$OUT/$name.kenlm.binary" "$corpus")
  n_tps=$(awk -v t="$tokens" -v s="$nq_s" 'BEGIN { printf "%.0f", t / s }')
  k_tps=$(awk -v t="$tokens" -v s="$kq_s" 'BEGIN { printf "%.0f", t / s }')
  p_tps=$(awk -v t="$tokens" -v s="$kp_s" 'BEGIN { printf "%.0f", t / s }')
  printf '%-16s %-28s %10s %10s %8s\n' "$name" "query tok/s, 1 core (bin)" "$n_tps" "$k_tps" "$(ratio "$n_tps" "$k_tps")"
  printf '%-16s %-28s %10s %10s %8s\n' "$name" "query tok/s vs kenlm python" "$n_tps" "$p_tps" "$(ratio "$n_tps" "$p_tps")"
done
