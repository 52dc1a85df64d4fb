"""A 1 GiB file of model weights (random, so incompressible) on busybox."""
from bench.rootfs import build_busybox
from imagefs import Image

image = Image.from_rootfs(str(build_busybox())).run_commands(
    "head -c 1073741824 /dev/urandom > /weights.bin")
