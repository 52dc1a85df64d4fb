"""Load a spec file: run it as a Python module and collect the Image values it defines."""
from __future__ import annotations

import runpy
import sys
import traceback
from pathlib import Path

from imagefs.builder.spec import Image, SpecError


def load_spec(target: str) -> dict[str, Image]:
    """SPEC.py or SPEC.py::NAME -> {name: Image}; SpecError if it does not import or defines none."""
    path_text, _, name = target.partition("::")
    path = Path(path_text)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    sys.path.insert(0, str(path.resolve().parent))
    try:
        namespace = runpy.run_path(str(path), run_name="__coldstart_spec__")
    except SpecError:
        raise
    except BaseException as e:  # a spec is user code: any failure is a clear spec error
        if isinstance(e, KeyboardInterrupt):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise SpecError(f"spec {path} does not import: {type(e).__name__}: {e} "
                        f"(at {Path(where.filename).name}:{where.lineno})") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    images = {k: v for k, v in namespace.items() if isinstance(v, Image) and not k.startswith("_")}
    if not images:
        raise SpecError(f"spec {path} defines no image (assign an Image to a module-level name)")
    if name:
        if name not in images:
            raise SpecError(f"spec {path} has no image named {name!r} (it has: {', '.join(sorted(images))})")
        return {name: images[name]}
    return images
