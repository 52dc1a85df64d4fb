"""Debian slim with the torch 2.13 CPU wheel from the host's wheel directory (the headline)."""
from imagefs import Image

image = Image.debian_slim(python_version="3.11").pip_install("torch==2.13.0", find_links="/opt/wheels")
