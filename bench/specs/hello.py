"""A tiny image: busybox, `echo`."""
from bench.rootfs import build_busybox
from imagefs import Image

image = Image.from_rootfs(str(build_busybox()))
