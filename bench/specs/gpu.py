"""torch on a GPU host: the torch image, run with --gpus all."""
from imagefs import Image

image = Image.debian_slim(python_version="3.11").pip_install("torch==2.13.0", find_links="/opt/wheels")
