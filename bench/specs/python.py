"""Debian slim with python3."""
from imagefs import Image

image = Image.debian_slim(python_version="3.11")
