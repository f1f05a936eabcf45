#!/usr/bin/env bash
# The CIFAR-10 ResNet-20 objective ablation of docs/results/cifar10_resnet20_objective.md.
#
#   bash docs/results/cifar10_resnet20_objective/run.sh STAGE [overrides...]
#
# Every cell is one `bqat-train -m` job under outputs/objective/ (hydra.sweep.dir), run one
# after another by Hydra's basic launcher. A cell's folder is named from its overrides, so
# re-running a stage skips the cells that finished (and resumes an interrupted one): the
# ablation can span sessions. Run each stage with nothing else on the machine: the cells'
# epoch times set the equal wall-clock budgets.
#
# Stages (each prints the overrides it runs; the choices between stages are made from the
# results of the earlier ones and written into the doc):
#   grid    W2A2, seed 0: (a) schedule=none and (b) schedule=prefix, CE only, lr 0.01/0.02/0.04
#           (the grid of 2026-12-01 ran when CE only was the default, without the two loss
#           keys: its folders in docs/results/ have the names of that command)
#   extra   any cell given as overrides, e.g. the KD grid:
#             run.sh extra schedule=prefix optim.optimizer.lr=0.02 loss.w_kd=1 loss.T=1,2,4
# Environment: CIFAR10 (default ../shared/data/cifar10-jpeg), PARTNER (default
# ../shared/partners/cifar10-jpeg-resnet20-fp.pt), EPOCHS (default 3), BQAT (default
# `python -m bqat.train`).
set -euo pipefail
STAGE=${1:?usage: run.sh grid|extra [overrides...]}; shift
CIFAR10=${CIFAR10:-../shared/data/cifar10-jpeg}
PARTNER=${PARTNER:-../shared/partners/cifar10-jpeg-resnet20-fp.pt}
EPOCHS=${EPOCHS:-3}
BQAT=${BQAT:-python -m bqat.train}
# The recipe of conf/experiment/cifar10_resnet20.yaml (lr 0.04, cosine to 0, batch 128, first and
# last layer at 8 bits, no clipping, the partner's BN eps) from the shared 40-epoch partner;
# quantizer cores compiled, as bqat-train's quant.compile=auto chooses for a run of the paper's
# length (and the same values as eager: tests/test_quantizers.py).
COMMON=(experiment=cifar10_resnet20 "data.root=$CIFAR10" "partner.checkpoint=$PARTNER" "trainer.epochs=$EPOCHS"
        quant.compile=true trainer.progress=false hydra.sweep.dir=outputs/objective)
case "$STAGE" in
  grid)  set -- bits=2 seed=0 schedule=none,prefix optim.optimizer.lr=0.01,0.02,0.04 loss.w_kd=0 loss.w_mp_kd=0 "$@" ;;
  extra) ;;
  *) echo "unknown stage $STAGE (grid | extra)" >&2; exit 2 ;;
esac
echo "+ $BQAT -m ${COMMON[*]} $*"
$BQAT -m "${COMMON[@]}" "$@"
