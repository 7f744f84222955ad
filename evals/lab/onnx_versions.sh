#!/usr/bin/env bash
# onnx_portability check of the exports in runs/port/x (see evals/reports/onnx_portability.md) on each onnxruntime
# version given, one venv each under /tmp/ort (slim_edge editable from this checkout, no torch):
#   evals/lab/onnx_versions.sh 1.27.0 1.26.0 ...     -> /tmp/ort/check-VERSION.json
set -u
cd "$(dirname "$0")/../.."
for v in "$@"; do
  V=/tmp/ort/v$v
  if [[ ! -f $V/.done ]]; then rm -rf $V;
    python3 -m venv $V && $V/bin/pip install -q "setuptools>=77" "numpy<2.3" onnx==1.23.2 transformers==5.17.0 "onnxruntime==$v" && \
      $V/bin/pip install -q --no-deps --no-build-isolation -e . && touch $V/.done || { echo "$v: install failed"; continue; }
  fi
  $V/bin/python -m slim_edge.evals.lab.onnx_portability check runs/port/x/* --ref runs/port/ref-ort132.npz \
      -o /tmp/ort/check-$v.json --force > /tmp/ort/log-$v.txt 2>&1
  echo "$v rc $? $(tail -c 300 /tmp/ort/log-$v.txt | tr '\n' ' ')"
done
