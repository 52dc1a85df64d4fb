"""coldstart's image model: content-addressed chunked images, importers, the builder, the lazy mount.

The public surface for spec files is `Image`; the rest is used through the `coldstart` command.
"""
from imagefs.builder.spec import Image

__all__ = ["Image"]
