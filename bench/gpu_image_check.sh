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
DEPS=""
[ "${1:-}" = "--deps" ] && DEPS=$(realpath "${2:?--deps DIR}")
rm -rf "$WORK"; mkdir -p "$WORK"
if [ -n "$DEPS" ]; then
    export PATH=$DEPS/bin:$PATH
    for lib in "$DEPS"/lib/*.so*; do
        [ -e "$lib" ] || continue
        ldconfig -p | grep -q "$(basename "$lib") " || { cp "$lib" /usr/lib/x86_64-linux-gnu/ && ldconfig; }
    done
    "$PY" -m pip install -q --no-index --target "$WORK/pydeps" "$DEPS"/wheels/*.whl 2>&1 | grep -vi warning
    export PYTHONPATH=$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import pyfuse3, trio" || { echo "the mount needs pyfuse3 and trio (see --deps)"; exit 2; }

R=$WORK/root
mkdir -p "$R"/{dev,proc,sys,tmp,etc,root}
for top in bin sbin lib lib64; do  # a merged-/usr host: the same links in the image
    [ -L "/$top" ] && { mkdir -p "$R/$(readlink -f "/$top" | sed 's,^/,,')"; ln -s "$(readlink "/$top")" "$R/$top"; }
done
copy() { for f in "$@"; do cp -L --parents "$f" "$R"; done; }
REAL=$("$PY" -c "import os, sys; print(os.path.realpath(sys.executable))")
BASE=$("$PY" -c "import sys; print(sys.base_prefix)")
VER=$("$PY" -c "import sys; print('python%d.%d' % sys.version_info[:2])")
for bin in "$REAL" /bin/sh /bin/ls /bin/grep /usr/bin/head /bin/mknod; do
    copy "$bin"
    for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do copy "$lib"; done
done
# the rest of glibc and the C++ runtime, which the driver's libraries and tools load
for lib in /lib/x86_64-linux-gnu/{libpthread.so.0,libdl.so.2,librt.so.1,libm.so.6,libresolv.so.2,libgcc_s.so.1,libstdc++.so.6}; do
    [ -e "$lib" ] && copy "$lib"
done
mkdir -p "$R/usr/bin"; ln -sf "$REAL" "$R/usr/bin/python3"
tar -C / --exclude='*/site-packages' --exclude='*/dist-packages' --exclude='*/test' --exclude='*/tests' \
    --exclude='*/idlelib' --exclude='*/tkinter' -cf - "${BASE#/}/lib/$VER" | tar -C "$R" -xf -
for lib in $(find "$R$BASE/lib/$VER/lib-dynload" -name '*.so' -exec ldd {} \; 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
    copy "$lib"
done
chroot "$R" /usr/bin/python3 -c "import ctypes, sys; print('image: python', sys.version.split()[0])" || exit 2

export COLDSTART_STORE=file://$WORK/store COLDSTART_CACHE=$WORK/cache
"$PY" -m tools.cli import "$R" gpu-check:1 || exit 2
COLDSTART="$PY -m tools.cli" PYTHON=$PY bash bench/gpu_check.sh gpu-check:1
rc=$?
"$PY" -m tools.cli umount --all >/dev/null 2>&1
rm -rf "$WORK"
exit $rc
