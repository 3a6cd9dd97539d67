#!/usr/bin/env bash
# The course's smoothing comparison: order-3 models of lines 1-4000 of Tiny
# Shakespeare, held-out perplexity (excluding OOVs) on lines 4001-4400.
# Usage: bash benches/smoothing.sh [ORDER]
source "$(dirname "$0")/common.sh"
order="${1:-3}"
build_nlp
head -n 4000 "$SHARED/data/tinyshakespeare.txt" > "$OUT/smoothing-train.txt"
sed -n 4001,4400p "$SHARED/data/tinyshakespeare.txt" > "$OUT/smoothing-test.txt"
printf '| smoothing |'; for m in mkn kn wb add-k jm mle; do printf ' %s |' "$m"; done; printf '\n| --- |'
for _ in 1 2 3 4 5 6; do printf ' --- |'; done; printf '\n| perplexity |'
for m in mkn kn wb add-k jm mle; do
  "$NLP" -q ngram train --order "$order" --smoothing "$m" "$OUT/smoothing-train.txt" -o "$OUT/smoothing-$m.bin" > /dev/null
  "$NLP" --json ngram query -m "$OUT/smoothing-$m.bin" "$OUT/smoothing-test.txt" \
    | python3 -c 'import json,sys; print(" %.4g |" % json.load(sys.stdin)["perplexity_excl_oov"], end="")'
done
echo
