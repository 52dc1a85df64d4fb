# Shared by bench/gpu_image_check.sh and bench/gpu_torch_start.sh (sourced, not run): getting a
# bare GPU host ready, and an image made from the host's own Python. Needs PY (the interpreter).

# parse_args "$@": the scripts' options, --deps DIR and --repeat N (sets DEPS and REPEAT).
parse_args() {
    DEPS=""
    REPEAT=3
    while [ $# -gt 0 ]; do
        case $1 in
            --deps) DEPS=$(realpath "$2"); shift 2 ;;
            --repeat) REPEAT=$2; shift 2 ;;
            *) echo "usage: $0 [--deps DIR] [--repeat N]"; return 2 ;;
        esac
    done
}

# install_deps DIR WORK: DIR/bin on PATH (e.g. runc); each DIR/lib/*.so* missing from the linker
# cache copied to /usr/lib/x86_64-linux-gnu; DIR/wheels/*.whl into WORK/pydeps, on PYTHONPATH.
install_deps() {
    local deps=$1 work=$2 lib
    export PATH=$deps/bin:$PATH
    for lib in "$deps"/lib/*.so*; do
        [ -e "$lib" ] || continue
        ldconfig -p | grep -q "$(basename "$lib") " || { cp "$lib" /usr/lib/x86_64-linux-gnu/ && ldconfig; }
    done
    "$PY" -m pip install -q --no-index --target "$work/pydeps" "$deps"/wheels/*.whl 2>&1 | grep -vi warning
    export PYTHONPATH=$work/pydeps${PYTHONPATH:+:$PYTHONPATH}
}

# make_python_image ROOT: the interpreter behind PY, its standard library, all of glibc and the
# C++ runtime (the driver's tools and libraries load them), sh and a few tools, at their host
# paths (a merged-/usr host's links too); /usr/bin/python3 points at the interpreter.
make_python_image() {
    local R=$1 top bin lib real base ver
    mkdir -p "$R"/{dev,proc,sys,tmp,etc,root}
    for top in bin sbin lib lib64; do
        [ -L "/$top" ] && { mkdir -p "$R/$(readlink -f "/$top" | sed 's,^/,,')"; ln -s "$(readlink "/$top")" "$R/$top"; }
    done
    real=$("$PY" -c "import os, sys; print(os.path.realpath(sys.executable))")
    base=$("$PY" -c "import sys; print(sys.base_prefix)")
    ver=$("$PY" -c "import sys; print('python%d.%d' % sys.version_info[:2])")
    for bin in "$real" /bin/sh /bin/ls /bin/grep /usr/bin/head /bin/mknod; do
        _copy "$R" "$bin"
        for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do _copy "$R" "$lib"; done
    done
    for lib in /lib/x86_64-linux-gnu/{libpthread.so.0,libdl.so.2,librt.so.1,libm.so.6,libresolv.so.2,libutil.so.1,libgcc_s.so.1,libstdc++.so.6}; do
        [ -e "$lib" ] && _copy "$R" "$lib"
    done
    mkdir -p "$R/usr/bin"; ln -sf "$real" "$R/usr/bin/python3"
    tar -C / --exclude='*/site-packages' --exclude='*/dist-packages' --exclude='*/test' --exclude='*/tests' \
        --exclude='*/idlelib' --exclude='*/tkinter' -cf - "${base#/}/lib/$ver" | tar -C "$R" -xf -
    for lib in $(find "$R$base/lib/$ver/lib-dynload" -name '*.so' -exec ldd {} \; 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
        _copy "$R" "$lib"
    done
    chroot "$R" /usr/bin/python3 -c "import ctypes, sys; print('image: python', sys.version.split()[0])"
}

# add_site_packages ROOT MODULE CODE: from the site-packages dir holding MODULE, every top-level
# package CODE imports natively, `nvidia` (CUDA libraries torch loads) and any `*.libs`, copied
# to the same path under ROOT, then the system libraries their own libraries link; prints the
# site-packages path (the image's PYTHONPATH).
add_site_packages() {
    local R=$1 module=$2 code=$3 site mods lib
    site=$("$PY" -c "import os, $module; print(os.path.dirname(os.path.dirname($module.__file__)))") || return 1
    mods=$("$PY" -c "import sys
$code
print(' '.join(sorted({m.split('.')[0] for m in list(sys.modules)})))" | tail -1) || return 1
    (cd "$site" && for m in $mods nvidia *.libs; do
        for p in "$m" "$m.py" "$m".*.so "$m".so; do [ -e "$p" ] && echo "$p"; done
    done | sort -u | tar -cf - -T - | tar -C "$R" --one-top-level="${site#/}" -xf -) || return 1
    find "$R$site" -name '*.so*' -type f -exec ldd {} + 2>/dev/null | grep -o '=> /[^ ]*' | cut -c4- \
        | grep -E '^/(usr/)?lib' | sort -u | while read -r lib; do [ -e "$R$lib" ] || _copy "$R" "$lib"; done
    echo "$site"
}

_copy() { local R=$1; shift; local f; for f in "$@"; do cp -L --parents "$f" "$R"; done; }
