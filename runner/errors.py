"""Errors the runner raises on purpose; each carries the exit code the CLI should use."""
from __future__ import annotations


class RunnerError(Exception):
    """Base of every runner error. Exit code 125 follows Docker: the runner, not the command, failed."""

    exit_code = 125


class UsageError(RunnerError):
    """Options that cannot work together or cannot be parsed."""


class UserNotFound(RunnerError):
    """A --user or image User name that the image's /etc/passwd or /etc/group does not list."""


class RuntimeUnavailable(RunnerError):
    """Neither runc nor crun can be used on this host."""


class ContainerStartError(RunnerError):
    """The OCI runtime refused to create or start the container."""

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GpuError(RunnerError):
    """--gpus cannot be honoured: no driver, no such GPU, or a broken CDI spec."""


class MountError(RunnerError):
    """A mount the runner needs (overlay, shared image mount) could not be made."""


class ImageError(RunnerError):
    """The image holds something the runner refuses to use (e.g. an oversized /etc/passwd)."""
