#!/usr/bin/env bash
# The whole GPU path on a real NVIDIA host: a small image made from this host's own Python 3
# (interpreter, standard library, glibc, sh and a few tools) is imported into a local store, then
# bench/gpu_check.sh runs its checks in containers of it through `coldstart run` (lazy FUSE mount,
# runc, GPU injection). For hosts that cannot build the bench's images (no network, no debootstrap).
#
#   bench/gpu_image_check.sh [--deps DIR]
#
# --deps DIR: install what a bare host lacks first: DIR/bin is put on PATH (e.g. runc), each
# DIR/lib/*.so* missing from the linker cache is copied to /usr/lib/x86_64-linux-gnu, and
# DIR/wheels/*.whl go to a private target dir on PYTHONPATH (e.g. pyfuse3 built with this repo's
# patch, trio, blake3, zstandard, pyfastcdc for that host's Python).
# Environment: PY (interpreter, default python3), WORK (default /tmp/gpu-image-check).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu-image-check}
. bench/gpu_lib.sh
parse_args "$@" || exit 2  # --deps DIR (--repeat is not used here)
rm -rf "$WORK"; mkdir -p "$WORK"
[ -n "$DEPS" ] && install_deps "$DEPS" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import pyfuse3, trio" || { echo "the mount needs pyfuse3 and trio (see --deps)"; exit 2; }
R=$WORK/root
make_python_image "$R" || exit 2

export COLDSTART_STORE=file://$WORK/store COLDSTART_CACHE=$WORK/cache
"$PY" -m tools.cli import "$R" gpu-check:1 || exit 2
COLDSTART="$PY -m tools.cli" PYTHON=$PY bash bench/gpu_check.sh gpu-check:1
rc=$?
"$PY" -m tools.cli umount --all >/dev/null 2>&1
rm -rf "$WORK"
exit $rc
