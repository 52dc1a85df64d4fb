"""The benchmark's image specs build on any host: the torch wheel directory is used where it exists
and left out (pip then takes torch from PyPI) where it does not, instead of failing the build."""
from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.builder.build import _command_of
from imagefs.builder.load import load_spec

SPECS = Path(__file__).parents[1] / "bench" / "specs"


@pytest.mark.parametrize("spec", ["torch.py", "gpu.py"])
def test_torch_specs_take_the_wheel_directory_only_where_it_exists(
        spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLDSTART_WHEELS", str(tmp_path))
    (image,) = load_spec(str(SPECS / spec)).values()
    script, _env, mounts = _command_of(image.steps[-1], None, None)
    assert f"--find-links {tmp_path}" in script and (str(tmp_path), str(tmp_path)) in mounts

    monkeypatch.setenv("COLDSTART_WHEELS", str(tmp_path / "missing"))
    (image,) = load_spec(str(SPECS / spec)).values()
    script, _env, mounts = _command_of(image.steps[-1], None, None)
    assert "--find-links" not in script and "torch==2.13.0" in script and mounts == []
