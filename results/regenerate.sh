#!/usr/bin/env bash
# Regenerate every result under results/ from the shipped base models:
#
#     bash results/regenerate.sh          # about 3 h on 2 CPU cores
#
# Every training run uses one thread (benchmark.py sees to it), so the figures repeat exactly
# on a machine whose CPU sums as this one did; results/README.md copies its tables from each
# OUT/table.md. After changing the toy world or the pretraining, make new bases first (each
# ~8 min; --pretrain never replaces a checkpoint, so remove the old one):
#     git rm results/base/ckpt.pt && python benchmark.py --pretrain --base results/base/ckpt.pt --out runs/new-base
#     git rm results/base-unseen/ckpt.pt && python benchmark.py --pretrain --p-new 0 --base results/base-unseen/ckpt.pt --out runs/new-base-unseen
set -euo pipefail
cd "$(dirname "$0")/.."

# the base models: every skill plainly and with a demonstration, greedy; the new skills sampled
python eval.py > results/base/eval.txt
python eval.py --temperature 1 --skills rotl,swap,odds --mistakes 0 > results/base/eval-sampled.txt
python eval.py --ckpt results/base-unseen/ckpt.pt --mistakes 0 > results/base-unseen/eval.txt
python eval.py --ckpt results/base-knowledge/ckpt.pt > results/base-knowledge/eval.txt

# how each method's learning rate was chosen: a sweep in the default order, 3 seeds
python benchmark.py --lr-sft 3e-5,1e-4,3e-4 --lr-sdft 1e-5,3e-5,1e-4 --seeds 0,1,2 --out results/lr
# the headline: every order of the three new skills, each method at its tuned rate, 3 seeds
python benchmark.py --orders all --seeds 0,1,2 --out results/orders
# the same with SDFT counting only the agreed prefix (not in the paper; results/NOTES.md)
python benchmark.py --orders all --seeds 0,1,2 --agreed-prefix --out results/orders-agreed
# controls: demonstrations in the model's own style; a base that never met the new skills
python benchmark.py --demo-style own --seeds 0,1,2 --out results/own
python benchmark.py --p-new 0 --base results/base-unseen/ckpt.pt --seeds 0,1,2 --out results/unseen
# why it works: the paper's ablations and baselines, each skill learned alone, 3 seeds
# (results/studies; the two smaller bases of the size study are committed, and made again if missing)
python studies.py all
# knowledge from documents (the paper's Table 1), on its own base, 10 and 50 facts, 3 seeds (~45 min);
# the pairs in the expert's style (the default), and in the model's own as the control (~2 min)
python knowledge.py --facts 10,50
python knowledge.py --demo-style own --out results/knowledge-own
