#!/usr/bin/env bash
# Device check for GPU injection (no NVIDIA container runtime): on a real NVIDIA host, run inside
# coldstart containers `nvidia-smi -L` and CUDA driver API calls (cuInit, device count, memcpy round
# trip, a PTX kernel), check device selection and isolation, and print "N passed, N failed".
#
#   bench/gpu_check.sh IMAGE          containers of IMAGE (needs python3 inside) via `coldstart run`
#   bench/gpu_check.sh --host-root    no image store: the host's / is the (read-only) image, through
#                                     `python3 -m runner`; the writable layers live on a private tmpfs
#
# Environment: COLDSTART (command for the first form, default `coldstart`), PYTHON (interpreter with
# this repo's runner importable and nvidia-ml-py installed, default .venv/bin/python or python3),
# BUDGET_S (whole-run budget, default 170: the script finishes in under 3 minutes).
set -u
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-170}
PASS=0
FAIL=0
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TMP=$(mktemp -d /tmp/gpu-check.XXXXXX)

if [ "${1:-}" = "--host-root" ]; then
    mount -t tmpfs -o size=512m,mode=0700 gpu-check "$TMP" || { echo "cannot mount a tmpfs on $TMP"; exit 2; }
    RUN="$PYTHON -m runner --lower-dir / --state-dir $TMP/state --layers-dir $TMP/layers"
    IMAGE=host:latest
    INNER_PY=/usr/bin/python3
else
    IMAGE=${1:?usage: bench/gpu_check.sh IMAGE | --host-root}
    RUN="${COLDSTART:-coldstart} run"
    INNER_PY=python3
fi
cleanup() { mountpoint -q "$TMP" && umount "$TMP"; rm -rf "$TMP"; }
trap cleanup EXIT

# check NAME SNIPPET: run the bash snippet (with $RUN, $IMAGE, ... exported) within the time left.
check() {
    local name=$1 snippet=$2 left=$((BUDGET_S - SECONDS)) out
    if [ "$left" -lt 5 ]; then
        FAIL=$((FAIL + 1)); echo "FAIL $name (no time left)"; return
    fi
    [ "$left" -gt 60 ] && left=60
    if out=$(timeout -k 5 "$left" bash -c "$snippet" 2>&1); then
        PASS=$((PASS + 1)); echo "ok   $name"
    else
        FAIL=$((FAIL + 1)); echo "FAIL $name"; printf '%s\n' "$out" | tail -8 | sed 's/^/       /'
    fi
}

CUDA_PY=$(cat <<'PY'
import ctypes, sys
from ctypes import POINTER, byref, c_int, c_size_t, c_uint, c_uint32, c_uint64, c_void_p
cu = ctypes.CDLL("libcuda.so.1")
cu.cuMemAlloc_v2.argtypes = [POINTER(c_uint64), c_size_t]
cu.cuMemcpyHtoD_v2.argtypes = [c_uint64, c_void_p, c_size_t]
cu.cuMemcpyDtoH_v2.argtypes = [c_void_p, c_uint64, c_size_t]
cu.cuMemFree_v2.argtypes = [c_uint64]
cu.cuLaunchKernel.argtypes = [c_void_p] + [c_uint] * 7 + [c_void_p, c_void_p, c_void_p]
def ok(result, what):
    if result != 0:
        name = ctypes.c_char_p()
        cu.cuGetErrorName(result, byref(name))
        sys.exit(f"{what} failed: {result} {name.value}")
PTX = b"""
.version 7.0
.target sm_50
.address_size 64
.visible .entry inc(.param .u64 p, .param .u32 n)
{
  .reg .pred %p<2>;
  .reg .b32 %r<7>;
  .reg .b64 %rd<5>;
  ld.param.u64 %rd1, [p];
  ld.param.u32 %r1, [n];
  mov.u32 %r2, %ctaid.x;
  mov.u32 %r3, %ntid.x;
  mov.u32 %r4, %tid.x;
  mad.lo.s32 %r5, %r2, %r3, %r4;
  setp.ge.u32 %p1, %r5, %r1;
  @%p1 bra DONE;
  cvta.to.global.u64 %rd2, %rd1;
  mul.wide.u32 %rd3, %r5, 4;
  add.s64 %rd4, %rd2, %rd3;
  ld.global.u32 %r6, [%rd4];
  add.u32 %r6, %r6, 1;
  st.global.u32 [%rd4], %r6;
DONE:
  ret;
}
"""
ok(cu.cuInit(0), "cuInit")
count = c_int()
ok(cu.cuDeviceGetCount(byref(count)), "cuDeviceGetCount")
if count.value < 1:
    sys.exit("no CUDA device")
dev = c_int()
ok(cu.cuDeviceGet(byref(dev), 0), "cuDeviceGet")
ctx = c_void_p()
ok(cu.cuCtxCreate_v2(byref(ctx), 0, dev), "cuCtxCreate")
n = 1 << 18
host = (c_uint32 * n)(*range(n))
back = (c_uint32 * n)()
ptr = c_uint64()
ok(cu.cuMemAlloc_v2(byref(ptr), 4 * n), "cuMemAlloc")
ok(cu.cuMemcpyHtoD_v2(ptr, host, 4 * n), "cuMemcpyHtoD")
ok(cu.cuMemcpyDtoH_v2(back, ptr, 4 * n), "cuMemcpyDtoH")
if list(back) != list(host):
    sys.exit("memcpy round trip differs")
if sys.argv[1:] == ["kernel"]:
    mod, fn = c_void_p(), c_void_p()
    ok(cu.cuModuleLoadData(byref(mod), PTX), "cuModuleLoadData (PTX JIT)")
    ok(cu.cuModuleGetFunction(byref(fn), mod, b"inc"), "cuModuleGetFunction")
    arg_p, arg_n = c_uint64(ptr.value), c_uint32(n)
    params = (c_void_p * 2)(ctypes.addressof(arg_p), ctypes.addressof(arg_n))
    ok(cu.cuLaunchKernel(fn, (n + 255) // 256, 1, 1, 256, 1, 1, 0, None, params, None), "cuLaunchKernel")
    ok(cu.cuCtxSynchronize(), "cuCtxSynchronize")
    ok(cu.cuMemcpyDtoH_v2(back, ptr, 4 * n), "cuMemcpyDtoH")
    if any(b != h + 1 for b, h in zip(back, host)):
        sys.exit("kernel result wrong")
ok(cu.cuMemFree_v2(ptr), "cuMemFree")
print(f"cuda ok: {count.value} device(s)")
PY
)

HOST_LIST=$(nvidia-smi -L 2>/dev/null)
ALL_UUIDS=$(printf '%s\n' "$HOST_LIST" | grep -o 'GPU-[0-9a-f-]*')
FIRST_UUID=$(printf '%s\n' "$ALL_UUIDS" | head -1)
LAST_UUID=$(printf '%s\n' "$ALL_UUIDS" | tail -1)
export RUN IMAGE INNER_PY CUDA_PY ALL_UUIDS FIRST_UUID LAST_UUID
echo "host: $(printf '%s\n' "$HOST_LIST" | grep -c '^GPU ') GPU(s); runner: $RUN"

check "host: nvidia-smi -L lists GPUs" '[ -n "$ALL_UUIDS" ]'
check "container: nvidia-smi -L lists every host GPU" \
    'got=$($RUN --gpus all $IMAGE -- nvidia-smi -L) && [ "$(printf "%s\n" "$got" | grep -o "GPU-[0-9a-f-]*")" = "$ALL_UUIDS" ]'
check "container: CUDA driver API (cuInit, count, alloc, memcpy round trip)" \
    '$RUN --gpus all $IMAGE -- $INNER_PY -c "$CUDA_PY"'
check "container: a PTX kernel runs (JIT through libnvidia-ptxjitcompiler)" \
    '$RUN --gpus all $IMAGE -- $INNER_PY -c "$CUDA_PY" kernel'
check "--gpus 0 gives exactly GPU 0" \
    'got=$($RUN --gpus 0 $IMAGE -- nvidia-smi -L) && [ "$(printf "%s\n" "$got" | grep -o "GPU-[0-9a-f-]*")" = "$FIRST_UUID" ]'
check "--gpus GPU-<uuid> gives exactly that GPU" \
    'got=$($RUN --gpus $LAST_UUID $IMAGE -- nvidia-smi -L) && [ "$(printf "%s\n" "$got" | grep -o "GPU-[0-9a-f-]*")" = "$LAST_UUID" ]'
check "without --gpus: no GPU nodes, and a hand-made one is refused" \
    'got=$($RUN $IMAGE -- sh -c "ls /dev | grep -c nvidia; mknod /dev/x c 195 255 && head -c1 /dev/x" 2>&1);
     printf "%s\n" "$got"; printf "%s\n" "$got" | grep -qx 0 && printf "%s" "$got" | grep -q "Operation not permitted"'
check "an unknown GPU is refused before anything starts" \
    '! got=$($RUN --gpus GPU-00000000-dead-beef-0000-000000000000 $IMAGE -- true 2>&1) && printf "%s" "$got" | grep -q "no such GPU"'
if ls /etc/cdi/*.json /etc/cdi/*.yaml /var/run/cdi/*.json /var/run/cdi/*.yaml >/dev/null 2>&1; then
    check "CDI: --gpus nvidia.com/gpu=0 gives one GPU" \
        '[ "$($RUN --gpus nvidia.com/gpu=0 $IMAGE -- nvidia-smi -L | grep -c "^GPU ")" = 1 ]'
fi

echo "$PASS passed, $FAIL failed  (${SECONDS}s)"
[ "$FAIL" -eq 0 ]
