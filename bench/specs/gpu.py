"""torch on a GPU host: the torch image (see torch.py for where its wheel comes from), run with
--gpus all."""
import os

from imagefs import Image

WHEELS = os.environ.get("COLDSTART_WHEELS", "/opt/wheels")
image = Image.debian_slim(python_version="3.11").pip_install(
    "torch==2.13.0", find_links=WHEELS if os.path.isdir(WHEELS) else None)
