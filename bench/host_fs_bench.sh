#!/usr/bin/env bash
# bench.fs_bench's `import` group on a host that cannot build the bench's rootfs (no network, no
# debootstrap): the rootfs is made from the host's own Python and the packages CODE imports
# (bench/gpu_lib.sh), so native and lazy run the same tree. The store is a directory on the
# host's disk (fs_bench --store file): SeaweedFS S3 needs weed and boto3, which such a host may
# lack (STORE=s3 to ask for it anyway).
#
#   bench/host_fs_bench.sh [--deps DIR] [--repeat N]     (as root; --deps: see gpu_image_check.sh)
#
# Environment: PY, WORK, MODULE (default torch), CODE (default "import torch"), STORE (file|s3).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/var/tmp/host-fs-bench}
MODULE=${MODULE:-torch}
CODE=${CODE:-import torch}
STORE=${STORE:-file}
. bench/gpu_lib.sh
parse_args "$@" || exit 2
rm -rf "$WORK"; mkdir -p "$WORK"
[ -n "$DEPS" ] && install_deps "$DEPS" "$WORK"
R=$WORK/root
make_python_image "$R" >/dev/null || exit 2
SITE=$(add_site_packages "$R" "$MODULE" "$CODE") || exit 2
echo "rootfs: $(du -sh "$R" | cut -f1), $(find "$R" | wc -l) entries"
# fs_bench runs the code as `python3 -c '...'` in a chroot: no single quotes in it
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -m bench.fs_bench --only torch --store "$STORE" \
    --repeat "$REPEAT" --rootfs "$R" --code "import sys; sys.path.insert(0, \"$SITE\"); $CODE" \
    --work "$WORK/fs" --out "${OUT_JSON:-$WORK/result.json}"
rc=$?
rm -rf "$R" "$WORK/fs" "$WORK/pydeps"  # the rootfs, store and caches (GBs); the result stays
exit $rc
