"""Debian slim with numpy from PyPI."""
from imagefs import Image

image = Image.debian_slim(python_version="3.11").pip_install("numpy")
