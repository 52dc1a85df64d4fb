"""Container runner: OCI spec generation, runc lifecycle, shared image mounts, GPU injection.

The CLI calls add_run_arguments() / options_from_args() / run(); the image filesystem plugs in through
LowerProvider (SharedMountProvider + SharedMounts give one reference-counted mount per image, store
and host cache per host).
"""
from runner.config import ImageConfig, ImageConfigLike
from runner.container import cleanup_stale
from runner.errors import (ContainerStartError, GpuError, MountError, RunnerError, RuntimeUnavailable,
                           UsageError, UserNotFound)
from runner.lower import (DirectoryProvider, Holder, Lower, LowerProvider, ResolvedImage,
                          SharedMountProvider)
from runner.options import MountSpec, RunOptions, add_run_arguments, options_from_args
from runner.run import RunResult, run
from runner.shared_mount import SharedMounts

__all__ = [
    "ContainerStartError", "DirectoryProvider", "GpuError", "Holder", "ImageConfig", "ImageConfigLike",
    "Lower", "LowerProvider", "MountError", "MountSpec", "ResolvedImage", "RunOptions", "RunResult",
    "RunnerError", "RuntimeUnavailable", "SharedMountProvider", "SharedMounts", "UsageError",
    "UserNotFound", "add_run_arguments", "cleanup_stale", "options_from_args", "run",
]
