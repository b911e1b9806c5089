#!/usr/bin/env bash
# Regenerate every result under results/ from the shipped base models:
#
#     bash results/regenerate.sh          # about 4 hours on 2 CPU cores, in parts: runs are cached
#
# Every training run uses one thread (benchmark.py sees to it), so the figures repeat exactly
# on a machine whose CPU sums as this one did; results/README.md copies its tables from each
# OUT/table.md. After changing the toy world or the pretraining, make new bases first (each
# ~7 min on one core; a base is never replaced, so remove the old one):
#     git rm results/base/ckpt.pt && python benchmark.py --pretrain --base results/base/ckpt.pt \
#         --out runs/new-base
#     git rm results/base-unseen/ckpt.pt && python benchmark.py --pretrain --p-new 0 \
#         --base results/base-unseen/ckpt.pt --out runs/new-base-unseen
set -euo pipefail
cd "$(dirname "$0")/.."

# the base models: every skill plainly and with a demonstration, greedy; the new skills sampled;
# the same recipe under pretraining seeds 0, 1, 2 (seeds 1 and 2 made in results/base/runs, ~7 min
# each); what the teacher does after a student's wrong first token
python eval.py > results/base/eval.txt
python eval.py --temperature 1 --skills jab,mug,hub,zag,max --mistakes 0 \
    > results/base/eval-sampled.txt
python benchmark.py --base-seeds 0,1,2 --out results/base
for s in jab mug hub zag max; do \
    echo "$s: $(python eval.py --inspect $s --n 50 --device cpu | tail -n 1)"; \
done > results/base/inspect.txt
python eval.py --ckpt results/base-unseen/ckpt.pt --mistakes 0 > results/base-unseen/eval.txt
echo "jab: $(python eval.py --ckpt results/base-unseen/ckpt.pt --inspect jab --n 50 \
    --device cpu | tail -n 1)" > results/base-unseen/inspect.txt

# how each method's learning rate was chosen: a sweep in the default order, 3 seeds, chosen on
# validation
python benchmark.py --lr-sft 1e-5,3e-5,1e-4,3e-4 --lr-sdft 3e-6,1e-5,3e-5 --seeds 0,1,2 \
    --out results/lr
# the headline: every order of the three new skills, each method at its chosen rate, 3 seeds
python benchmark.py --orders all --seeds 0,1,2 --out results/orders
# the same with SDFT counting only the agreed prefix (not in the paper; results/NOTES.md)
python benchmark.py --orders all --seeds 0,1,2 --agreed-prefix --out results/orders-agreed
# the longer sequence: five new skills, in one order and in its reverse
python benchmark.py --skills jab,mug,hub,zag,max --seeds 0,1,2 --out results/long
python benchmark.py --skills max,zag,hub,mug,jab --seeds 0,1,2 --out results/long-reverse
# what drives the win: SDFT against SFT and DFT on expert, SFT on own-style and teacher-sampled
# demonstrations, offline distillation, each at 5 rates (chosen on validation), 1000 steps per
# skill, 3 seeds, every order
python lab/decomposition.py --orders all
# when does on-policy learning matter? the paper's Fig. 6 under 5 conditions, 4 rates, 3 skills,
# 3 seeds (~1 h; the slips world's base made where missing, ~20 min)
python lab/map.py
python eval.py --ckpt results/base-slips/ckpt.pt --mistakes 0 > results/base-slips/eval.txt
# controls: demonstrations in the model's own style; a base that never met the new skills
python benchmark.py --demo-style own --seeds 0,1,2 --out results/own
python benchmark.py --p-new 0 --base results/base-unseen/ckpt.pt --seeds 0,1,2 --out results/unseen

# why it works: the paper's ablations and baselines, each skill learned alone, 3 seeds
# (the size study's two smaller bases are made in results/studies/size, ~3 min each)
python lab/studies.py all
# knowledge from documents (the paper's Table 1), on its own base (made where missing, ~25 min),
# 3 seeds
python lab/knowledge.py --facts 10,50
python lab/knowledge.py --demo-style own --out results/knowledge-own
python eval.py --ckpt results/base-knowledge/ckpt.pt --mistakes 0 > results/base-knowledge/eval.txt
# reasoning without reasoning data (the paper's Table 2): a thinking base (made where missing,
# ~15 min), then base, SFT and SDFT on three reasoning skills from answer-only demonstrations,
# 3 seeds
python lab/reasoning.py
python lab/variants.py eval.py --reasoning --ckpt results/base-reasoning/ckpt.pt \
    --skills copy,rev,rotr,drop,evens,ends,flip,qam,wub,hak,jaw,bux,kaw,jug --mistakes 0 \
    > results/base-reasoning/eval.txt
# the peer check: TRL's SDFTTrainer against train_sdft.py on jab, 3 seeds (~5 min; needs
# pip install -r requirements.txt -r lab/requirements-speed.txt)
if python -c "import trl" 2> /dev/null; then python lab/peer.py
else echo "skipped lab/peer.py: no TRL"; fi
