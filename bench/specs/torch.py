"""Debian slim with torch 2.13.0 (the headline): the CPU wheel from the host's wheel directory
where it has one ($COLDSTART_WHEELS, default /opt/wheels, as on this project's machines), else
from PyPI (on x86_64 PyPI's is the larger CUDA build, which runs on the CPU as well)."""
import os

from imagefs import Image

WHEELS = os.environ.get("COLDSTART_WHEELS", "/opt/wheels")
image = Image.debian_slim(python_version="3.11").pip_install(
    "torch==2.13.0", find_links=WHEELS if os.path.isdir(WHEELS) else None)
