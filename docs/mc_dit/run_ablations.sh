#!/usr/bin/env bash
# The MC-DiT ablations of docs/results/mc_dit.md (docs/method/mc_dit.md §5), with the same recipe as
# run_comparison.sh (N steps, batch 32), then the branch-C probes of every run with a clean
# branch (context probe = D_c's inpainting MSE; collapse probe = ||ΔX̂0|| / ||Δinput|| when the
# masked patches' noise is redrawn).  Run from the repo root after run_comparison.sh:
#   bash docs/mc_dit/run_ablations.sh N NSAMPLES     (the docs used N=150, NSAMPLES=200)
set -euo pipefail
N=${1:-150}
NS=${2:-200}
source "$(dirname "$0")/common.sh"
probes() {  # run variant
  .venv/bin/python -m mdm_jax.cli.eval_gaussian --mode=probes --config=$CFG:$2 --workdir=$R/fm_$1 \
    --config.eval.batch_size=64 --config.eval.num_batches=4 > $R/probes_$1.json 2> $R/probes_$1.log
}
train_eval c_only arm=mcdit,c_only $N         # C without G on one decoder (the collapse ablation)
train_eval context_t arm=mcdit,context_t $N   # visible patches at a small t_u < t
train_eval n2c arm=mcdit,n2c $N               # noisy-to-clean: visible patches at t
probes mcdit arm=mcdit
probes c_only arm=mcdit,c_only
probes context_t arm=mcdit,context_t
probes n2c arm=mcdit,n2c
