#!/usr/bin/env bash
# Interoperability with Hugging Face's Python stack: files `nlp` writes load in
# `transformers` and `peft` and give the same log-likelihoods there, and an adapter `peft`
# writes loads in `nlp`.
#  1. `nlp train` (a small char-level Llama, a few hundred steps) -> `transformers`'
#     LlamaForCausalLM reads the run directory.
#  2. `nlp lora train` on that model -> `peft`'s PeftModel on the same base.
#  3. `peft` writes a fresh adapter with non-zero B -> `nlp eval --adapter`.
#  4. `nlp lora merge` -> `transformers` reads the merged directory.
# Each check scores the same token-id lines on both sides (`nlp eval --ids --json`'s
# total_nll against PyTorch's sum of -log p over every token after the first) and
# fails beyond 1e-4 nats per token.
# Usage: bash benches/interop.sh   (env: TRAIN_STEPS, LORA_STEPS)
source "$(dirname "$0")/common.sh"
build_nlp
python_env torch transformers peft safetensors
I="$OUT/interop"
rm -rf "$I"
mkdir -p "$I"
TRAIN_STEPS="${TRAIN_STEPS:-200}"
LORA_STEPS="${LORA_STEPS:-30}"

# 1. A model of our own, and the lines both sides score: 8 lines of Tiny Shakespeare's
# held-out tail, as ids of the run's tokenizer.
"$NLP" -q --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 \
  --set model.n_kv_heads=2 --set train.eval_every=0 --set train.checkpoint_every=0 \
  train "$SHARED/data/tinyshakespeare.txt" --steps "$TRAIN_STEPS" -o "$I/model"
tail -n 200 "$SHARED/data/tinyshakespeare.txt" | grep -v '^$' | head -n 8 > "$I/lines.txt"
"$NLP" bpe encode -t "$I/model/tokenizer.json" "$I/lines.txt" > "$I/ids.txt"

# 2. A LoRA adapter on it, with PEFT's default targets for Llama plus the MLP.
"$NLP" -q --set train.eval_every=0 --set train.checkpoint_every=0 \
  lora train --base "$I/model" --data "$SHARED/data/tinyshakespeare.txt" -o "$I/adapter" \
  --rank 4 --alpha 8 --target q_proj,v_proj,down_proj --steps "$LORA_STEPS" --lr 3e-3

# 4. The adapter merged into an ordinary model directory.
"$NLP" -q lora merge --base "$I/model" --adapter "$I/adapter" -o "$I/merged"

nll() { # MODEL [ADAPTER]: nlp's total NLL in nats of ids.txt
  local extra=()
  [ $# -gt 1 ] && extra=(--adapter "$2")
  "$NLP" -q eval --json --ids "$I/ids.txt" -m "$1" "${extra[@]}" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['total_nll'])"
}
ours_model=$(nll "$I/model")
ours_adapter=$(nll "$I/model" "$I/adapter")
ours_merged=$(nll "$I/merged")

# 3 and the Python side of the rest.
HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore \
"$VENV/bin/python" - "$NLP" "$I" "$ours_model" "$ours_adapter" "$ours_merged" <<'PY'
import json, subprocess, sys
import torch
from transformers import LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

nlp, root = sys.argv[1:3]
ours_model, ours_adapter, ours_merged = map(float, sys.argv[3:])
lines = [[int(t) for t in line.split()] for line in open(f"{root}/ids.txt") if line.split()]
scored = sum(len(ids) - 1 for ids in lines)
torch.manual_seed(0)

def total_nll(model):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for ids in lines:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
    return total

def base():
    return LlamaForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.float32)

failed = False
def check(what, ours, theirs):
    global failed
    per_token = abs(ours - theirs) / scored
    ok = per_token <= 1e-4
    failed |= not ok
    print(f"| {what} | {ours:.5f} | {theirs:.5f} | {per_token:.2e} | {'ok' if ok else 'FAIL'} |")

print(f"## {len(lines)} lines, {scored} scored tokens: total NLL in nats, nlp vs PyTorch")
print("| check | nlp | PyTorch | difference per token | <= 1e-4 |")
print("| --- | --- | --- | --- | --- |")
check("nlp train -> transformers LlamaForCausalLM", ours_model, total_nll(base()))
check("nlp lora train -> peft PeftModel", ours_adapter,
      total_nll(PeftModel.from_pretrained(base(), f"{root}/adapter")))
check("nlp lora merge -> transformers", ours_merged,
      total_nll(LlamaForCausalLM.from_pretrained(f"{root}/merged", torch_dtype=torch.float32)))

# An adapter PEFT writes, with random (non-zero) B so that it changes the logits, and
# rsLoRA scaling.
config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                    init_lora_weights=False, use_rslora=True, task_type="CAUSAL_LM")
theirs = get_peft_model(base(), config)
theirs.save_pretrained(f"{root}/peft-adapter")
ours = json.loads(subprocess.run(
    [nlp, "-q", "eval", "--json", "--ids", f"{root}/ids.txt",
     "-m", f"{root}/model", "--adapter", f"{root}/peft-adapter"],
    check=True, capture_output=True, text=True).stdout)["total_nll"]
check("peft get_peft_model (rsLoRA, random B) -> nlp eval --adapter", ours, total_nll(theirs))
sys.exit(1 if failed else 0)
PY
