#!/usr/bin/env bash
# Rebuild every table, plot and JSON in bench/results/ with the commands docs/benchmarks.md reports.
#
#   bench/regenerate.sh                 # everything: quality runs missing from bench/results/cache are trained
#   bench/regenerate.sh --tables-only   # quality tables and plots from the cache alone, no training, no timing
#
# bench/quality.py keeps every finished (split, method, seed) run in bench/results/cache (ignored by git),
# so a rerun trains only what is missing. On a fresh clone the cache is empty: the quality tables then train
# 178 runs of 8, 16 or 20 epochs each: 63 of the 8-epoch table's 66 took 5.3 CPU-hours on the machine that ran
# them, the 16-epoch table's 28 trained runs 6.1 more, its batch-320 control's 3 0.3, the batch-32 probe's 9
# trained runs 1.3, the 16-epoch Dirichlet rows' 9 trained runs 1.3, the queue-temperature-0.1 table's 6
# trained runs 1.8, its `public` row's 3 runs 0.8, the doubled-learning-rate DP rows' 6 runs 1.7 (with their
# pixels and random rows), the 2e-3 rows' 12 runs 1.9, the queue-temperature-0.1 Dirichlet fedcl rows' 3 runs
# 0.7, the same at 2e-3 0.7, the five-seed tables' 10 runs of seeds 3 and 4 1.0, the NT-Xent-0.5 tables' 17
# runs 2.8, and the plain table about
# 3.5 on a machine 2.4 times slower per run (docs/benchmarks.md).
# The timing benchmarks (overhead, DP overhead, context state, scale) always rerun and take minutes; their
# figures depend on the machine's load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "no Python at $PY: run ./scripts/setup.sh first, or set PYTHON=/path/to/python" >&2
    exit 2
fi
export FLWR_TELEMETRY_ENABLED=0
tables_only=0
case "${1:-}" in
    "") ;;
    --tables-only) tables_only=1 ;;
    *) echo "unknown option $1: use no option (rebuild everything) or --tables-only" >&2; exit 2 ;;
esac
cached=()
[ "$tables_only" = 1 ] && cached=(--cached-only)

# the recipe of every cluttered-regime table below (docs/benchmarks.md, "The main table: cluttered Fashion-MNIST"):
# 5 sites x 2000 images, width 16, Adam at 1e-3 with kept state, rounds of 1/32 epoch (1 local step), 128 fresh
# pushes per site and round; each command adds its splits, batch size, rounds, rows and tag
CLUTTERED=(--dataset fashion-mnist-cluttered --seeds 0,1,2 --sites 5 --images-per-site 2000 --width 16 --lr 1e-3
           --rounds-per-epoch 32 --persist-optimizer --num-push 128 --eval-every 32 --test-images 2000 --threads 1)
ALL_ROWS=pixels,random,local,fedsimclr,fedcl,fedcl_noqueue,fedcl_dp8,fedcl_dp3,fedcl_prototypes,fedcl_public,central
# the tables trained before train.queue_temperature existed had the queue term at NT-Xent's temperature (0.2);
# this flag keeps their cache keys. The rows without a queue term do not read it (same key either way).
FORMER=(--queue-temperature 0.2)

# the 8-epoch table (quality.json): both splits (pathological, Dirichlet alpha = 0.1), 3 seeds, every row;
# 8 epochs as 256 rounds
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological,dirichlet0.1 --batch-size 64 --rounds 256 \
    --methods "$ALL_ROWS" "${FORMER[@]}" "${cached[@]}"

# the 16-epoch table (quality_budget16.*, queue term at 0.2): the same recipe at 16 epochs (512 rounds) instead of 8,
# on the pathological split, every row (docs/benchmarks.md, "The 16-epoch table")
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 \
    --methods "$ALL_ROWS" --tag _budget16 "${FORMER[@]}" "${cached[@]}"

# the control of the budget probe (quality_central_b320.*): central SimCLR with the images of a whole federated
# round in each step (batch 320 = 5 sites x 64), so as many sequential updates as the federation's 512 rounds;
# and the plot of every curve against sequential updates (quality_budget16_updates.png)
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 320 --rounds 512 \
    --methods central --tag _central_b320 "${FORMER[@]}" "${cached[@]}"
"$PY" bench/plot_updates.py bench/results/quality_budget16.json bench/results/quality_central_b320.json \
    --out bench/results/quality_budget16_updates.png

# the batch-32 probe (quality_b32.*): the 16-epoch recipe at batch 32 for every row it has, i.e. twice the
# sequential updates for the federated rows and for central alike (docs/benchmarks.md, "At batch 32")
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 32 --rounds 512 \
    --methods pixels,random,fedsimclr,fedcl,central --tag _b32 "${FORMER[@]}" "${cached[@]}"

# the Dirichlet split at 16 epochs, the rows of the targets only (quality_budget16_dirichlet.*): the 16-epoch
# table's command on the other split (docs/benchmarks.md, "The 16-epoch table")
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits dirichlet0.1 --batch-size 64 --rounds 512 \
    --methods pixels,random,fedsimclr,fedcl,central --tag _budget16_dirichlet "${FORMER[@]}" "${cached[@]}"

# the 16-epoch table at the shipped queue temperature 0.1 (quality_qt01.*, the README's): the 16-epoch table's
# command without --queue-temperature 0.2. The rows without a queue term are the 16-epoch table's runs (same
# cache keys); the queue's rows retrain (docs/benchmarks.md, "Queue temperature 0.1")
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 \
    --methods pixels,random,local,fedsimclr,fedcl,fedcl_noqueue,fedcl_dp8,central --tag _qt01 "${cached[@]}"

# the `public` release at queue temperature 0.1 (quality_qt01_public.*): the qt01 table's command for the row
# it did not retrain. `prototypes` at 0.1 is not trained (its figures at 0.2 are the 16-epoch table's)
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 \
    --methods fedcl_public --tag _qt01_public "${cached[@]}"
# DP-SGD at epsilon = 8 and 3 with the learning rate doubled (quality_qt01_dp.*, docs/benchmarks.md, "DP-SGD
# at twice the learning rate"): the qt01 table's command at --lr 2e-3, with its pixels and random-init rows
# (they do not read the learning rate: the qt01 table's runs, same cache keys)
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --lr 2e-3 \
    --methods pixels,random,fedcl_dp8,fedcl_dp3 --tag _qt01_dp "${cached[@]}"
# every learned row that reads the learning rate at 2e-3 (quality_qt01_lr2.*, docs/benchmarks.md, "The few-label
# gap to central"): the qt01 table's command at --lr 2e-3; pixels and random init are the qt01 table's runs
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --lr 2e-3 \
    --methods pixels,random,fedsimclr,fedcl,fedcl_noqueue,central --tag _qt01_lr2 "${cached[@]}"
# fedcl on the Dirichlet split at 16 epochs at the shipped queue temperature 0.1 (quality_qt01_dirichlet.*), with
# pixels and random init; FedSimCLR and central do not read the setting: their runs are quality_budget16_dirichlet's
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits dirichlet0.1 --batch-size 64 --rounds 512 \
    --methods pixels,random,fedcl --tag _qt01_dirichlet "${cached[@]}"
# the same at 2e-3 (quality_qt01_dirichlet_lr2.*, docs/benchmarks.md, "Around 2e-3"): fedcl retrains, pixels
# and random init are the command above's runs
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits dirichlet0.1 --batch-size 64 --rounds 512 --lr 2e-3 \
    --methods pixels,random,fedcl --tag _qt01_dirichlet_lr2 "${cached[@]}"
# seeds 3 and 4 beside 0 to 2 for the rows of the within-3-of-central target (docs/benchmarks.md, "Around
# 2e-3"): central at 1e-3 (quality_qt01_seeds5.*), fedcl and central at 2e-3 (quality_qt01_lr2_seeds5.*);
# seeds 0 to 2 are the qt01 and qt01_lr2 tables' runs
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --seeds 0,1,2,3,4 \
    --methods pixels,random,central --tag _qt01_seeds5 "${cached[@]}"
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --seeds 0,1,2,3,4 \
    --lr 2e-3 --methods pixels,random,fedcl,central --tag _qt01_lr2_seeds5 "${cached[@]}"
# NT-Xent at 0.5 instead of 0.2 (docs/benchmarks.md, "NT-Xent at 0.5 for the federation"): fedcl at 2e-3 over
# five seeds (quality_qt01_t05_lr2_seeds5.*, the README's fedcl row), and the other learned rows that read it at
# their rate, 1e-3 (quality_qt01_t05.*); pixels and random init are the five-seed tables' runs
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --seeds 0,1,2,3,4 \
    --lr 2e-3 --temperature 0.5 --methods pixels,random,fedcl --tag _qt01_t05_lr2_seeds5 "${cached[@]}"
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits pathological --batch-size 64 --rounds 512 --temperature 0.5 \
    --methods pixels,random,fedsimclr,fedcl_noqueue,central --tag _qt01_t05 "${cached[@]}"
"$PY" bench/quality.py "${CLUTTERED[@]}" --splits dirichlet0.1 --batch-size 64 --rounds 512 --temperature 0.5 \
    --methods pixels,random,fedcl --tag _qt01_t05_dirichlet "${cached[@]}"

# plain Fashion-MNIST's main rows on the shipped federation (quality_fashion_mnist_shipped.*). The committed
# quality_fashion_mnist.* is the table of the former bench copy of the round (removed): no command rebuilds
# it; its pixels row is this command's. Its fedcl rows predate fdb2b3d's loss, which this command trains.
RECIPE=(--seeds 0,1,2 --local-epochs 1 --images-per-site 1000 --width 16 --test-images 2000 --batch-size 64
        --lr 3e-4 --threads 1)
"$PY" bench/quality.py --splits pathological "${RECIPE[@]}" --rounds 160 --rounds-per-epoch 8 --persist-optimizer \
    --eval-every 8 --methods pixels,random,fedsimclr,fedcl,fedcl_noqueue,central --tag _fashion_mnist_shipped \
    "${FORMER[@]}" "${cached[@]}"
[ "$tables_only" = 1 ] && exit 0

"$PY" bench/overhead.py > bench/results/overhead.txt
{ echo "# python bench/dp_overhead.py --threads 1 --steps 10 --profile   ($(date -u '+%Y-%m-%d %H:%M') UTC)"
  "$PY" bench/dp_overhead.py --threads 1 --steps 10 --profile; } > bench/results/dp_overhead.txt
"$PY" bench/context_state.py
"$PY" bench/scale.py --sites 10,50,100
