#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, as one script sized for a short device lease
# (about 10 minutes): the fp16/bf16 checks of every implicit method (fp16 cg included), the
# cost table of both regimes on CUDA, the core benchmark, and the language-model example in
# bf16. Run from the repository root on a machine with CUDA and PyTorch; betty is used from
# the source tree:
#     OUT=outputs/gpu bash benchmarks/gpu_session.sh
# Each part writes $OUT/<part>.txt as it goes (what finished is kept if the lease ends) and
# has its own time limit. Nothing in the repository is written.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"

part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $?" >> "$OUT/$name.txt"
  tail -n 4 "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  date -u; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
part checks 90 python3 benchmarks/gpu_checks.py
part cost_table 240 python3 benchmarks/bench_cost_table.py --device cuda --steps 3
part core 120 python3 benchmarks/bench_core.py --device cuda --repeats 3 --steps-a 500 \
  --steps-b 100
part lm 150 python3 examples/lm_data_mixing/main.py --device cuda --bf16 --quick
