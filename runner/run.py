"""`coldstart run`: resolve, mount, build the bundle, run the container under runc, clean up."""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner import spec as specgen
from runner.container import ContainerPaths, OwnerRecord, cleanup_stale, new_container_id, prepare, teardown
from runner.edits import SpecEdits
from runner.errors import ContainerStartError, UsageError
from runner.lower import Holder, Lower, LowerProvider, ResolvedImage, StartCommand
from runner.mounts import mount_overlay
from runner.options import RunOptions
from runner.procs import ProcessRef, become_subreaper
from runner.runtime import Runtime, mark_crun_unusable, select_runtime
from runner.signals import Interrupted, SignalRouter
from runner.stream import ReadyWatcher, Sink, fd_sink, relay
from runner.supervisor import Guard
from runner.timings import Timings
from runner.users import resolve_user, write_in_root

if TYPE_CHECKING:
    from runner.gpu import GpuHost, GpuPlan

SpecHook = Callable[[dict[str, object]], None]


@dataclass
class RunResult:
    exit_code: int
    container_id: str
    timings: dict[str, float | bool | None]
    runtime: str
    ready: bool
    upper_dir: Path | None = None
    notices: list[str] = field(default_factory=list)


def run(options: RunOptions, provider: LowerProvider, *, stdout: Sink | None = None,
        stderr: Sink | None = None, gpu_host: GpuHost | None = None,
        spec_hook: SpecHook | None = None) -> RunResult:
    """Run one container to completion; its exit code is the result's (128+N if killed by signal N).

    Everything is checked (runtime, GPUs, mounts, image) before anything is created; whatever happens
    afterwards, the container, its overlay, bundle and writable layer are removed (the layer is kept
    with options.keep) and the image lower is released.
    """
    timings = Timings()
    err = stderr or fd_sink(2)
    cleanup_stale(options.state_dir, provider.release, options.layers_dir)
    runtime, notices = select_runtime(options.runtime, options.state_dir)
    _check_mounts(options)
    _check_timings_json(options)
    image = provider.resolve(options.image)
    timings.mark("image_resolved")
    gpu_plan = _plan_gpus(options, image, gpu_host) if options.gpus else None
    job = _Job(options, provider, image, runtime, timings, stdout or fd_sink(1), err, gpu_plan, spec_hook)
    job.notices += notices
    for notice in notices:
        err(f"coldstart: {notice}\n".encode())
    code = job.run()
    timings.finish()
    _report(options, timings, err)
    return RunResult(code, job.paths.id, timings.as_dict(), job.runtime.name, job.watcher.matched,
                     job.paths.upper if options.keep else None, job.notices)


def _plan_gpus(options: RunOptions, image: ResolvedImage, host: GpuHost | None) -> GpuPlan:
    from runner.gpu import GpuHost, plan_gpus
    assert options.gpus is not None
    return plan_gpus(options.gpus, options.env, image.config.env, host or GpuHost())


def _check_mounts(options: RunOptions) -> None:
    for m in options.mounts:
        if not m.host.exists():
            raise UsageError(f"--mount: {m.host} does not exist")


def _check_timings_json(options: RunOptions) -> None:
    """Fail before the run, not after it, when the timings file cannot be written."""
    path = options.timings_json
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"--timings-json: {path} is a directory")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UsageError(f"--timings-json: {path.parent} is not a writable directory")


def _report(options: RunOptions, timings: Timings, err: Sink) -> None:
    if options.timings:
        err((timings.human() + "\n").encode())
    if options.timings_json is not None:
        try:
            timings.write_json(options.timings_json)
        except OSError as exc:  # the run itself succeeded: keep its exit code
            err(f"coldstart: cannot write --timings-json {options.timings_json}: {exc.strerror or exc}\n".encode())


class _Job:
    """One container's life: guard, state, lower, overlay, spec, runtime, relay, teardown."""

    def __init__(self, options: RunOptions, provider: LowerProvider, image: ResolvedImage, runtime: Runtime,
                 timings: Timings, out: Sink, err: Sink, gpu_plan: GpuPlan | None,
                 spec_hook: SpecHook | None) -> None:
        self.options, self.provider, self.image, self.runtime = options, provider, image, runtime
        self.timings, self.out, self.err = timings, out, err
        self.gpu_plan, self.spec_hook = gpu_plan, spec_hook
        self.paths = ContainerPaths.create_for(new_container_id(), options.state_dir, options.layers_dir)
        self.watcher = ReadyWatcher(options.ready_regex, warn=self._notice)
        self.notices: list[str] = []
        self.router = SignalRouter()
        self._exit_code: int | None = None
        self._init_pid: int | None = None

    def run(self) -> int:
        become_subreaper()
        guard = Guard.start(self._guard_teardown)
        try:
            with self.router:
                try:
                    return self._run_guarded(guard)
                except Interrupted as exc:
                    return 128 + exc.signum
                finally:
                    self.router.defer()
                    self._teardown()
        finally:
            guard.disarm()

    def _run_guarded(self, guard: Guard) -> int:
        owners = [ProcessRef.current(), ProcessRef.of(guard.pid)]
        record = OwnerRecord(owners, self.runtime, self.image.image_id, str(self.paths.layer), self.options.keep)
        prepare(self.paths, record)
        self.image.start = self._start_command()
        lower = self.provider.acquire(self.image, Holder(self.paths.id, tuple(owners)))
        self.timings.mount_cold = lower.cold
        self.timings.mark("mount_ready")
        mount_overlay(lower.path, self.paths.upper, self.paths.work, self.paths.rootfs, volatile=not self.options.keep)
        self.timings.mark("rootfs_ready")
        self._write_spec(lower)
        self.timings.mark("spec_ready")
        return self._launch(guard, record)

    def _write_spec(self, lower: Lower) -> None:
        spec = specgen.build_spec(self._spec_inputs(lower))
        if self.spec_hook is not None:
            self.spec_hook(spec)
        (self.paths.bundle / "config.json").write_text(json.dumps(spec))

    def _start_command(self) -> StartCommand:
        """The container's command, environment and directory as far as the image and the options
        tell them (before users and GPU edits): the provider may guess what to prefetch from it,
        and the spec takes the arguments and directory from it."""
        opts, config = self.options, self.image.config
        args = specgen.compose_args(config.entrypoint, config.cmd, opts.entrypoint, opts.command)
        env = specgen.merge_env(config.env, [], opts.env, os.environ, {"PATH": specgen.DEFAULT_PATH})
        path = next((e[5:] for e in env if e.startswith("PATH=")), specgen.DEFAULT_PATH)
        return StartCommand(args, path, opts.workdir or config.working_dir or "/")

    def _spec_inputs(self, lower: Lower) -> specgen.SpecInputs:
        opts, config = self.options, lower.config
        user = resolve_user(lower.path, opts.user if opts.user is not None else config.user)
        edits = self.gpu_plan.edits(lower.path) if self.gpu_plan is not None else SpecEdits()
        hostname = opts.hostname or (os.uname().nodename if opts.network == "host" else self.paths.id[-12:])
        self._write_etc_files(self.paths.rootfs, hostname)
        defaults = {"PATH": specgen.DEFAULT_PATH, "HOSTNAME": hostname, "HOME": user.home}
        start = self.image.start or self._start_command()  # the command, as worked out for the mount
        return specgen.SpecInputs(
            args=start.argv,
            env=specgen.merge_env(config.env, [edits.env], opts.env, os.environ, defaults),
            cwd=start.cwd, user=user, hostname=hostname,
            network=opts.network, mounts=opts.mounts,
            memory=opts.memory, cpus=opts.cpus, pids_limit=opts.pids_limit, edits=edits, nofile=_nofile(),
        )

    def _write_etc_files(self, rootfs: Path, hostname: str) -> None:
        """/etc/hostname, /etc/hosts (and resolv.conf with the host network) written into the writable layer."""
        files = {"/etc/hostname": f"{hostname}\n",
                 "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n"}
        if self.options.network == "host":
            try:
                files["/etc/resolv.conf"] = Path("/etc/resolv.conf").read_text()
            except OSError:
                pass
        for dest, text in files.items():
            problem = write_in_root(rootfs, dest, text)
            if problem is not None:
                self._notice(f"left the image's {dest} as it is: {problem}")

    def _launch(self, guard: Guard, record: OwnerRecord) -> int:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            init_pid = self._create(guard, record, out_w, err_w, (out_r, err_r))
            os.close(out_w)
            os.close(err_w)
            out_w = err_w = -1
            return self._start_and_relay(init_pid, out_r, err_r)
        finally:
            for fd in (out_r, err_r, out_w, err_w):
                if fd >= 0:
                    os.close(fd)

    def _create(self, guard: Guard, record: OwnerRecord, out_w: int, err_w: int, readers: tuple[int, int]) -> int:
        """`runtime create`; with crun chosen automatically, a failure falls back to runc once."""
        code, message = self._create_once(guard, out_w, err_w, readers)
        if code != 0 and self.runtime.name == "crun" and self.options.runtime == "auto":
            mark_crun_unusable(self.options.state_dir, self.runtime, message.strip() or "crun create failed")
            self._notice(f"crun failed ({message.strip()}); falling back to runc")
            self.runtime, _ = select_runtime("runc", self.options.state_dir)
            record = OwnerRecord(record.owners, self.runtime, record.image_id, record.layer, record.keep)
            self.paths.owner.write_text(record.to_json())
            code, message = self._create_once(guard, out_w, err_w, readers)
        if code != 0:
            raise ContainerStartError(f"{self.runtime.name} create failed: {message.strip()}", _start_exit_code(message))
        self.timings.mark("runc_create")
        self._init_pid = self._read_init_pid()
        return self._init_pid

    def _read_init_pid(self) -> int:
        """The container's init, from the pid file that `runtime create` must have written."""
        try:
            text = self.paths.pid_file.read_text().strip()
        except OSError as exc:
            raise ContainerStartError(f"{self.runtime.name} create wrote no pid file ({exc.strerror}): "
                                      f"is {self.runtime.path} an OCI runtime?") from None
        if re.fullmatch(r"[0-9]{1,10}", text) is None:
            raise ContainerStartError(f"{self.runtime.name} create wrote a bad pid file: {text[:40]!r}")
        return int(text)

    def _create_once(self, guard: Guard, out_w: int, err_w: int, readers: tuple[int, int]) -> tuple[int, str]:
        stdin = 0 if self.options.interactive else subprocess.DEVNULL
        argv = self.runtime.argv("create", "--bundle", str(self.paths.bundle), "--pid-file",
                                 str(self.paths.pid_file), self.paths.id)
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out_w, stderr=err_w)
        try:
            guard.note_process(ProcessRef.of(proc.pid))
        except ProcessLookupError:
            pass
        try:
            proc.wait()
        except Interrupted:
            proc.wait()
            raise
        if proc.returncode == 0:
            return 0, ""
        return proc.returncode, _read_available(readers)

    def _start_and_relay(self, init_pid: int, out_r: int, err_r: int) -> int:
        pidfd = os.pidfd_open(init_pid)
        try:
            self.router.forward_to(init_pid)
            started = self.runtime.start(self.paths.id)
            if started.returncode != 0:
                raise ContainerStartError(f"{self.runtime.name} start failed: {started.stderr.decode().strip()}")
            self.timings.mark("runc_start")
            relay({out_r: self.out, err_r: self.err}, pidfd, lambda: self._reap(init_pid),
                  self.timings, self.watcher)
        finally:
            os.close(pidfd)
        assert self._exit_code is not None
        return self._exit_code

    def _reap(self, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        self.router.defer()
        self.timings.mark("exit")
        code = os.waitstatus_to_exitcode(status)
        self._exit_code = code if code >= 0 else 128 - code

    def _notice(self, text: str) -> None:
        self.notices.append(text)
        self.err(f"coldstart: {text}\n".encode())

    def _teardown(self) -> None:
        problems = self._guard_teardown()
        for problem in problems:
            self._notice(f"cleanup: {problem}")
        if self._init_pid is not None and self._exit_code is None:
            _reap_killed(self._init_pid)

    def _guard_teardown(self) -> list[str]:
        problems = []
        runtimes = [self.runtime] + ([Runtime("runc", "runc")] if self.runtime.name == "crun" else [])
        for extra in runtimes[1:]:
            extra.delete(self.paths.id)
        problems += teardown(self.paths, runtimes[0], self.options.keep,
                             lambda: self.provider.release(self.image.image_id, self.paths.id))
        return problems


def _reap_killed(pid: int) -> None:
    """Collect the container's init after a failed start (the runtime killed it) so no zombie stays."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)


def _nofile() -> int:
    """The container's open-file limit: the runner's hard limit (raising it needs CAP_SYS_RESOURCE)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else min(hard, 1048576)


def _read_available(fds: tuple[int, ...]) -> str:
    """What the failed runtime printed (it shares the container's pipes)."""
    chunks = []
    for fd in fds:
        os.set_blocking(fd, False)
        try:
            while data := os.read(fd, 65536):
                chunks.append(data)
        except BlockingIOError:
            pass
    return b"".join(chunks).decode("utf-8", "replace")


def _start_exit_code(message: str) -> int:
    """Docker's convention: 127 for a command not found, 126 for one that cannot be run, else 125."""
    match = re.search(r'exec: \\?".*?\\?": (.*)', message)  # runc's log escapes the quotes
    if match is None:
        return 125
    reason = match.group(1).lower()
    if "executable file not found" in reason or "no such file or directory" in reason:
        return 127
    return 126 if "permission denied" in reason else 125
