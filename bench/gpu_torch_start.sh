#!/usr/bin/env bash
# Time to the first CUDA tensor on a real GPU host: `python3 -c "import torch; ... cuda ..."`
# natively (the host's own Python and torch, page cache dropped) against `coldstart run --gpus all`
# of an image holding the same interpreter and packages: cold (empty host cache) and warm (host
# cache full, a fresh mount replaying what the last one learned), modes interleaved, medians.
# The store is a directory on the host's disk (no network), so `cold` here is the floor of a
# lazy start: every chunk is read, checked and decompressed, none waits for a network.
#
#   bench/gpu_torch_start.sh [--deps DIR] [--repeat N]      (as root; --deps: see gpu_image_check.sh)
#
# The image is made from the host (bench/gpu_lib.sh) plus, from the site-packages holding MODULE
# (default torch), every top-level package the code imported natively, `nvidia` (the CUDA
# libraries torch loads) and any `*.libs`. Environment: PY, WORK, MODULE, CODE, GPUS (default all).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/var/tmp/gpu-torch-start}
MODULE=${MODULE:-torch}
CODE=${CODE:-"import torch; x = torch.ones(1, device='cuda'); torch.cuda.synchronize(); print('ready', float(x.sum()))"}
GPUS=${GPUS-all}
ORIG_PYTHONPATH=${PYTHONPATH:-}
. bench/gpu_lib.sh
parse_args "$@" || exit 2
rm -rf "$WORK"; mkdir -p "$WORK"
[ -n "$DEPS" ] && install_deps "$DEPS" "$WORK"
CS_PATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$ORIG_PYTHONPATH
cs() { PYTHONPATH=$CS_PATH "$PY" -m tools.cli "$@"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }'; }

R=$WORK/root
make_python_image "$R" >/dev/null || exit 2
SITE=$(add_site_packages "$R" "$MODULE" "$CODE") || exit 2
echo "image: $(du -sh "$R" | cut -f1) ($(cd "$R$SITE" && ls | tr '\n' ' '))"
export COLDSTART_STORE=file://$WORK/store
t=$(now); cs import "$R" torch-gpu:1 | tail -1; echo "import: $(since "$t") s"
GPU_ARGS=(); [ -n "$GPUS" ] && GPU_ARGS=(--gpus "$GPUS")
run_cs() {  # run_cs CACHE [extra args]: seconds to the ready line, from coldstart's own timings
    local cache=$1; shift
    cs umount --all >/dev/null 2>&1
    drop
    cs run "${GPU_ARGS[@]}" -e PYTHONPATH="$SITE" --cache "$cache" --ready-regex '^ready' \
        --timings-json "$WORK/t.json" "$@" torch-gpu:1 -- python3 -c "$CODE" >/dev/null || return 1
    "$PY" -c "import json; print(round(json.load(open('$WORK/t.json'))['ready'], 3))"
}
run_native() {
    drop
    local t; t=$(now)
    "$PY" -c "$CODE" | grep -q '^ready' || return 1
    since "$t"
}
run_cs "$WORK/cache-warm" >/dev/null || { echo "warm-up run failed"; exit 1; }
declare -A T
for i in $(seq "$REPEAT"); do
    for mode in native cold warm; do
        case $mode in
            native) v=$(run_native) ;;
            cold) rm -rf "$WORK/cache-cold"; v=$(run_cs "$WORK/cache-cold" --no-prefetch) ;;
            warm) v=$(run_cs "$WORK/cache-warm") ;;
        esac
        echo "repeat $i $mode ${v:-FAILED}"
        T[$mode]="${T[$mode]:-} ${v:-nan}"
    done
done
cs umount --all >/dev/null 2>&1
for mode in native cold warm; do
    echo "$mode:${T[$mode]}"
done | "$PY" -c "
import statistics, sys
rows = {l.split(':')[0]: [float(x) for x in l.split(':')[1].split()] for l in sys.stdin}
base = statistics.median(rows['native'])
for mode, xs in rows.items():
    m = statistics.median(xs)
    print(f'{mode:7s} median {m:.2f} s  ({min(xs):.2f}-{max(xs):.2f})  {m / base:.2f}x native')"
rm -rf "$WORK"
