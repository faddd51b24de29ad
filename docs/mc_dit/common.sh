# Shared settings of run_comparison.sh and run_ablations.sh (sourced; N and NS set by the caller):
# the recipe of docs/results/mc_dit.md (batch 32, AdamW 1e-3 after 50 warm-up steps, EMA 0.98) and the
# evaluation (held-out L_G at 8 levels + classifier Frechet distance of NS samples, DDIM 25).
R=runs/mcdit
CFG=configs/fashion_mnist_mcdit.py
CLF=${CLF:-runs/img/fmnist_classifier}
COMMON="--config.training.batch_size=32 --config.training.learning_rate=1e-3 \
 --config.training.warmup_steps=50 --config.training.ema_decay=0.98 \
 --config.eval.every_steps=$N --config.checkpoint.every_steps=$N --config.checkpoint.keep_best=0 \
 --config.sampling.num_steps=25 --config.training.log_every=25"
EVAL="--classifier_path=$CLF --num_samples=$NS --sample_batch=100 --sample_steps=25 \
 --guidance=1.0 --config.eval.batch_size=64 --config.eval.num_batches=4"
mkdir -p $R
train_eval() {  # run variant steps: train, then evaluate (eval_RUN.json)
  local run=$1 var=$2 steps=$3
  /usr/bin/time -f "wall_s %e user_s %U" .venv/bin/python -m mdm_jax.main \
    --config=$CFG:$var --workdir=$R/fm_$run --config.training.num_steps=$steps $COMMON \
    > $R/fm_$run.log 2>&1
  .venv/bin/python -m mdm_jax.cli.eval_gaussian --config=$CFG:$var --workdir=$R/fm_$run $EVAL \
    > $R/eval_$run.json 2> $R/eval_$run.log
}
