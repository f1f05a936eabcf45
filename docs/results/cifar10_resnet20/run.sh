#!/usr/bin/env bash
# The CIFAR-10 ResNet-20 result of docs/results/cifar10_resnet20.md, exactly as it was run.
#
#   bash docs/results/cifar10_resnet20/run.sh CIFAR10_ROOT RESULTS_DIR BUDGET_SECONDS [PARTNER_EPOCHS]
#
# 1. timing, each run alone on the device: the FP partner (trained once and cached), then two
#    epochs each of LSQ + block replacement (schedule=prefix) and plain LSQ (schedule=none),
#    W2A2; the second epoch's time is the steady-state epoch cost;
# 2. the result: W2A2 and W4A4, LSQ and LSQ + block replacement at E epochs each, plus plain
#    LSQ at E' = E x (prefix epoch / none epoch) epochs, the equal wall-clock budget; E is the
#    largest whole number of epochs the remaining budget allows. The six runs share the device
#    (run side by side); their accuracy does not depend on that, their wall time does, so
#    step costs come from step 1.
# 3. the reports (scripts/report.py) of the equal-epoch and the equal-time comparisons.
# Needs bqat importable (PYTHONPATH=. in a clone) and an accelerator or patience.
set -u
ROOT=$1; RESULTS=$2; BUDGET=$3; P=${4:-30}
START=$(date +%s)
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
elapsed() { echo $(( $(date +%s) - START )); }
COMMON="experiment=cifar10_resnet20 data.root=$ROOT partner.epochs=$P trainer.progress=false"

# Seconds of the last twin epoch in a run's log ("twin epoch 2/2 (12.3 s training): ...").
epoch_seconds() { grep -o "twin epoch [0-9]*/[0-9]* ([0-9.]* s training)" "$1" | tail -1 | sed 's/.*(\([0-9.]*\) s.*/\1/'; }

echo "== [$(elapsed) s] timing runs (alone on the device)"
$PY -m bqat.train $COMMON bits=2 schedule=prefix trainer.epochs=2 hydra.run.dir=outputs/timing/prefix 2>&1 | tee "$RESULTS/timing_prefix.log"
$PY -m bqat.train $COMMON bits=2 schedule=none trainer.epochs=2 hydra.run.dir=outputs/timing/none 2>&1 | tee "$RESULTS/timing_none.log"
T_PREFIX=$(epoch_seconds "$RESULTS/timing_prefix.log"); T_NONE=$(epoch_seconds "$RESULTS/timing_none.log")
echo "epoch seconds: prefix $T_PREFIX none $T_NONE" | tee "$RESULTS/timing.txt"
[ -n "$T_PREFIX" ] && [ -n "$T_NONE" ] || { echo "timing runs failed"; exit 1; }

# Six runs side by side cost about SLOWDOWN x one run alone (measured on the H100: see the doc).
SLOWDOWN=${SLOWDOWN:-3.5}
LEFT=$(( BUDGET - $(elapsed) - 40 ))
E=$($PY -c "print(max(1, int($LEFT / ($SLOWDOWN * $T_PREFIX + 1e-9))))")
EQ=$($PY -c "print(round($E * $T_PREFIX / $T_NONE))")
echo "== [$(elapsed) s] result runs: E=$E epochs, equal-time plain LSQ E'=$EQ epochs" | tee -a "$RESULTS/timing.txt"
for b in 2 4; do
  $PY -m bqat.train $COMMON bits=$b schedule=prefix trainer.epochs=$E > "$RESULTS/w${b}_prefix_e$E.log" 2>&1 &
  $PY -m bqat.train $COMMON bits=$b schedule=none trainer.epochs=$E > "$RESULTS/w${b}_none_e$E.log" 2>&1 &
  if [ "$EQ" != "$E" ]; then
    $PY -m bqat.train $COMMON bits=$b schedule=none trainer.epochs=$EQ > "$RESULTS/w${b}_none_e$EQ.log" 2>&1 &
  fi
done
wait
echo "== [$(elapsed) s] reports"
mkdir -p "$RESULTS/runs"
for d in outputs/runs/*/; do
  [ -f "$d/metrics.json" ] && mkdir -p "$RESULTS/runs/$(basename "$d")" && cp "$d/metrics.json" "$d/.hydra/overrides.yaml" "$RESULTS/runs/$(basename "$d")/" 2>/dev/null
done
$PY scripts/report.py outputs/runs --name cifar10_resnet20_gpu --out "$RESULTS/reports" || true
echo "== [$(elapsed) s] done"
