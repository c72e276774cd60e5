#!/usr/bin/env bash
# The GPU checks of benchmarks/gpu_check.py, under torchrun with one process (nccl), in under 8 minutes,
# with no downloads (every model is random and built in process). One ok/FAIL/skip line per check, then a
# summary; the exit status is the number of failed checks (0 on a machine without a CUDA GPU).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
PY="${PYTHON:-python}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch on this machine: the GPU checks cannot run (exit 0)"
    exit 0
fi
# 480 s: the whole script stays under the 8 minutes it promises, even if a check hangs.
exec timeout --signal=TERM 480 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/gpu_check.py "$@"
