"""Local backend: runs the task scripts as subprocesses on this machine.

Each phase is one process group (so a kill or timeout takes buildah and the container with it); stdout and
stderr are read in chunks and split into lines, timestamped on arrival, and reported before the phase's end
event. Nothing is retried or stored here.

Bounded: a line longer than `max_line_bytes` is split (and marked) while it is read, so an endless line without
a newline never sits in memory whole; and at most `max_inflight_bytes` of log text, in at most 20,000 lines,
wait in the event queue: a reader stops reading (the task then blocks on its full pipe) until the consumer has
taken earlier lines.

Measured, not told: the backend reaps each task script itself (`os.wait4`), whose resource usage covers the
script and every process it waited for (git, buildah, build steps, test containers); CPU seconds and peak RSS go
with the phase's end event. What a script reports besides its log (the build's cache use) are control lines
carrying the phase's nonce (jobforge.control): a job's commands cannot forge them.

No orphans, no litter: a task script gets SIGTERM when the service dies (it sets PR_SET_PDEATHSIG on itself and
then stops its whole group, see templates/tasks/_common.py), and each phase records its process group id in its workspace,
so `reap()` at the next start kills whatever is left and removes leftover buildah containers (the storage is
this backend's own and nothing runs before `reap()`; templates/tasks/sweep.py, the sweep the phases also run
around their containers). A phase's workspace `work/<job_id>/<phase>-*` is removed
when the phase ends, and `work/<job_id>` with its last phase. A stop that arrives before the process exists
prevents the start.

A full disk fails the phase, whatever filled it: a test container's output goes to a file in the workspace, and
a write failing there is silent (the shell's error goes to the same file), so while a phase runs the free space
of the disks it writes to (workspaces, buildah storage) is checked every `disk_poll` seconds; below
`_DISK_FULL_BYTES` the phase is stopped with "no space left on device", whatever its output says.

Run as root, the service runs every phase as the unprivileged build user (rootless buildah with the user's
sub-uids): a build step's root is that user's uid, the data dir (0700 root) and the service's environment are out
of reach. That user's workspaces and layer cache live in its own home (`~/.local/share/jobforge`), which the
service never writes into as root: the payload goes through the script's stdin.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp

from jobforge.backends.base import BackendMessage, JobEvent, LogChunk
from jobforge.config import JobConfig, format_duration
from jobforge.control import NONCE_ENV, ControlLines, new_nonce
from jobforge.errors import ConfigError, SecretReadError
from jobforge.logcaps import DEFAULT_MAX_LINE_BYTES, LineSplitter, decode_piece
from jobforge.models import LogLine, LogStream, utcnow
from jobforge.pipeline import (
    KILLED_BY_USER,
    CacheUse,
    DispatchPhase,
    PhaseFailed,
    PhaseStarted,
    PhaseSucceeded,
    ResourceUsage,
    StopPhase,
)
from jobforge.tasks import task_script

_ERROR_PREFIX = "ERROR: "
_READ_CHUNK = 16 * 1024  # bytes per read: the lines of one read are handled in one go on the event loop
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "USER", "XDG_RUNTIME_DIR")
_MAX_INFLIGHT_BYTES = 8 * 1024 * 1024
_MAX_INFLIGHT_LINES = 20_000
_MAX_ERROR_CHARS = 2000  # of an "ERROR: " line, as the phase's error (it goes into the job record)


class _Inflight:
    """Characters and lines of log text queued but not yet taken by the consumer; readers wait while either is
    over its limit. Lines are bounded too: each is a few tracked objects, and a full garbage collection scans them
    all while the event loop waits (300,000 short lines in flight made 0.3 s pauses of /health)."""

    def __init__(self, limit: int, line_limit: int = _MAX_INFLIGHT_LINES) -> None:
        self.limit, self.line_limit = limit, line_limit
        self.used = self.lines = 0
        self._room = asyncio.Event()
        self._room.set()

    def _full(self) -> bool:
        return self.used >= self.limit or self.lines >= self.line_limit

    async def reserve(self, size: int, lines: int) -> None:
        while self._full():
            self._room.clear()
            await self._room.wait()
        self.add(size, lines)

    def add(self, size: int, lines: int) -> None:
        """Take room without waiting (a system line must never wait behind the flood it reports on)."""
        self.used += size
        self.lines += lines

    def release(self, size: int, lines: int) -> None:
        self.used -= size
        self.lines -= lines
        if not self._full():
            self._room.set()
_PGID_FILE = ".pgid"
_ENOSPC_SEEN = "\0no space left on device"  # a marker kept first in the error list; never a real line
_EARLY_STOPS = 1000  # stops remembered for phases not dispatched yet
_COALESCE_LINES = 500  # lines per message at most when merging waiting chunks (a few ms of work for the service)
_REAP_WAIT = 10.0
_MASK = "***"  # as the task scripts and the redaction of URLs write it
_MIN_MASKED_CHARS = 4  # shorter values would mask ordinary text; they are still never logged by the service
_DISK_FULL_BYTES = 64 * 1024  # free space below which a disk counts as full (writes are failing or about to)

JobEnv = Callable[[str, JobConfig], Awaitable[dict[str, str]]]
"""(phase, config) -> the phase's own secret environment (the job's Vault values); SecretReadError on failure."""

log = logging.getLogger("jobforge.backends.local")


def _proc_info(pid: str) -> tuple[int, bytes] | None:
    """(process group id, environment) of a process, None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
    return int(fields[2]), environ


def _processes() -> dict[int, tuple[int, bytes]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := _proc_info(name)) is not None:
            out[int(name)] = info
    return out


def free_bytes(path: Path) -> int | None:
    """Free space for unprivileged writers on the disk holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize
    return None


def build_account(name: str | None) -> pwd.struct_passwd | None:
    """The account phases run as: `name` when the service runs as root, else the service's own (None)."""
    if not name or os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"JOBFORGE_BUILD_USER {name!r} does not exist: create it with sub-uid and sub-gid "
                          "ranges (`make build-user`), or set JOBFORGE_BUILD_USER= to run phases as root",
                          [{"field": "JOBFORGE_BUILD_USER", "rule": "must name an existing user"}]) from None
    if account.pw_uid == 0:
        raise ConfigError("JOBFORGE_BUILD_USER must be an unprivileged user",
                          [{"field": "JOBFORGE_BUILD_USER", "rule": "must not be uid 0"}])
    return account



class _Child:
    """A task script this backend reaps itself: `os.wait4` hands over the resource usage of the script and of
    every descendant it waited for (git, buildah, build steps, test containers), which asyncio's subprocess
    support throws away. That is the phase's usage as the kernel counted it, whatever the job printed."""

    def __init__(self, popen: subprocess.Popen, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader,
                 stdin: asyncio.WriteTransport) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout, self.stderr, self.stdin = stdout, stderr, stdin
        self.returncode: int | None = None
        self.usage: ResourceUsage | None = None
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (a kernel before 5.3): one thread blocks in wait4 instead
            threading.Thread(target=lambda: loop.call_soon_threadsafe(self._reaped, *os.wait4(self.pid, 0)[1:]),
                             daemon=True, name=f"wait4-{self.pid}").start()
            return

        def readable() -> None:
            try:
                pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (nothing here does): its status and usage are lost
                pid, status, rusage = self.pid, None, None
            if pid:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                self._reaped(status, rusage)
        loop.add_reader(pidfd, readable)

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], payload: bytes, **account) -> _Child:
        """Started in its own session (process group), the payload written to its stdin and stdin closed."""
        loop = asyncio.get_running_loop()
        popen = subprocess.Popen(argv, cwd="/", env=env, start_new_session=True, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, **account)
        readers = []
        for pipe in (popen.stdout, popen.stderr):
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
            readers.append(reader)
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, popen.stdin)
        stdin.write(payload)
        stdin.close()  # after the buffer is written; a script that exits first just loses it
        return cls(popen, *readers, stdin)

    def _reaped(self, status: int | None, rusage) -> None:
        self.returncode = self._popen.returncode = -1 if status is None else os.waitstatus_to_exitcode(status)
        if rusage is not None:
            self.usage = ResourceUsage(cpu_seconds=rusage.ru_utime + rusage.ru_stime,
                                       memory_peak_bytes=rusage.ru_maxrss * 1024)  # KiB on Linux
        self._exited.set_result(None)

    async def wait(self) -> int:
        await asyncio.shield(self._exited)  # a timed-out wait leaves the child watched
        assert self.returncode is not None
        return self.returncode


@dataclass
class _Run:
    process: _Child | None = None
    stopped: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Outcome:
    returncode: int
    timed_out: bool
    last_error: str | None
    disk_full: bool = False
    """The phase's output reported a full disk: the usual, actionable cause of its failure."""
    disk_full_at: str | None = None
    """Set when the phase was stopped because a disk it writes to filled up (the error, naming the disk)."""
    usage: ResourceUsage | None = None
    cache: CacheUse | None = None


class LocalBackend:
    resumable = False

    def __init__(self, *, work_dir: Path, storage_root: Path, storage_runroot: Path, registry_url: str,
                 tls_verify: bool, secret_env: dict[str, str] | None = None, kill_grace: float = 10.0,
                 python: str = sys.executable, clock: Callable[[], datetime] = utcnow,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_inflight_bytes: int = _MAX_INFLIGHT_BYTES,
                 build_user: str | None = None, build_network: str = "outbound", job_env: JobEnv | None = None,
                 disk_poll: float = 1.0) -> None:
        self._job_env = job_env
        self._disk_poll = disk_poll
        self._account = build_account(build_user)
        self._work_dir = work_dir
        self._registry_url = registry_url
        self._tls_verify = tls_verify
        self._kill_grace = kill_grace
        self._python = python
        self._clock = clock
        self._max_line_bytes = max_line_bytes
        self._inflight = _Inflight(max_inflight_bytes)
        self._queue: asyncio.Queue[BackendMessage] = asyncio.Queue()
        self._runs: dict[str, _Run] = {}
        self._early_stops: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        base = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        if self._account is not None:
            # The account's own home, name and layer cache; the data dir is root's alone.
            base = {**{k: v for k, v in base.items() if k not in ("XDG_RUNTIME_DIR", "TMPDIR")},
                    "HOME": self._account.pw_dir, "USER": self._account.pw_name}
            own = Path(self._account.pw_dir) / ".local" / "share" / "jobforge"
            self._work_dir, storage_root, storage_runroot = own / "work", own / "buildah", own / "buildah-run"
            work_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            work_dir.parent.chmod(0o700)
        self._env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            "JOBFORGE_BUILD_NETWORK": build_network,
            "JOBFORGE_BUILDAH_ROOT": str(storage_root),
            "JOBFORGE_BUILDAH_RUNROOT": str(storage_runroot),
            "JOBFORGE_STORAGE_DRIVER": "vfs",
            "JOBFORGE_ISOLATION": "chroot",
            **(secret_env or {}),
        }
        self._disks = [self._work_dir, storage_root]  # where phases write: a full one fails the running phase

    # ------------------------------------------------------------ Backend API

    async def dispatch(self, command: DispatchPhase, payload: dict, config: JobConfig) -> None:
        key = command.dispatch_key
        if key in self._runs:
            return
        run = self._runs[key] = _Run()
        if self._early_stops.pop(key, False) is None:
            run.stopped = True  # killed before it was dispatched: it must not start
        self._spawn(self._run_phase(command, payload, config, run))

    async def stop(self, command: StopPhase) -> None:
        key = f"{command.job_id}-{command.phase.value}-{command.attempt}"
        run = self._runs.get(key)
        if run is None:
            self._early_stops[key] = None
            while len(self._early_stops) > _EARLY_STOPS:
                self._early_stops.popitem(last=False)
            return
        if run.done.is_set():
            return
        run.stopped = True
        if run.process is not None:
            await self._terminate(run.process)

    async def reap(self) -> None:
        """At start, before anything runs: kill the phase processes a previous server left behind (found by the
        process group recorded in each workspace, or by their JOBFORGE_WORKDIR), remove leftover buildah
        containers, and delete the workspaces."""
        marker = f"JOBFORGE_WORKDIR={self._work_dir}/".encode()
        procs = _processes()
        groups = {pgid for pid, (pgid, environ) in procs.items() if pid != os.getpid() and marker in environ}
        for pgid_file in self._work_dir.glob(f"*/*/{_PGID_FILE}"):
            try:
                pgid = int(pgid_file.read_text())
            except (OSError, ValueError):
                continue
            leader = procs.get(pgid)
            # A recorded group is ours if its leader is gone (ours died; a reused id would lead its own group)
            # or the leader still carries our workspace.
            if leader is None or marker in leader[1]:
                groups.add(pgid)
        groups.discard(os.getpgrp())
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
                log.warning("killed leftover phase processes (process group %d)", pgid)
            except (ProcessLookupError, PermissionError):
                pass
        for _ in range(int(_REAP_WAIT / 0.05)):
            if not any(pgid in groups for pgid, _ in _processes().values()):
                break
            await asyncio.sleep(0.05)  # the kernel reaps SIGKILLed processes asynchronously
        if shutil.which("buildah", path=self._env.get("PATH")):
            await self._sweep_containers()
        if self._work_dir.exists():
            for leftover in self._work_dir.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    async def _sweep_containers(self) -> None:
        """The task scripts' own sweep (templates/tasks/sweep.py), run as the phases run: a build user's rootless
        storage is never written by root."""
        proc = await asyncio.create_subprocess_exec(
            *self._interpreter(), str(task_script("sweep")), cwd="/", env={**self._env, "JOBFORGE_PAYLOAD": "-"},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            **self._as_account())
        out, err = await proc.communicate(b"{}")
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("==> "):
                log.warning("%s", line[4:])
        if proc.returncode != 0:
            errors = [line for line in err.decode(errors="replace").splitlines() if line.startswith(_ERROR_PREFIX)]
            log.warning("could not remove leftover buildah containers: %s",
                        errors[-1][len(_ERROR_PREFIX):] if errors else f"exit code {proc.returncode}")

    async def cleanup(self, job_id: str, payload: dict, config: JobConfig) -> bool:
        try:
            secrets = await self._secrets("cleanup", config)
        except SecretReadError as exc:
            # The temp image lives on the service's registry: delete it anyway; only a rollback on the job's
            # publish host needs the job's credentials (and then fails, and is retried, naming that host).
            log.warning("cleanup of %s without the job's Vault credentials: %s", job_id, exc.message,
                        extra={"job_id": job_id})
            secrets = {}
        outcome = await self._execute(job_id, "cleanup", "cleanup", payload, _Run(), timeout=300, secrets=secrets)
        return outcome.returncode == 0 and not outcome.timed_out

    async def events(self) -> AsyncIterator[BackendMessage]:
        while True:
            message = await self._queue.get()
            # Coalesce log lines that are already waiting, so the store writes them in one transaction; at most
            # _COALESCE_LINES, since the service handles a chunk in one go on the event loop.
            while isinstance(message, LogChunk) and not self._queue.empty() and len(message.lines) < _COALESCE_LINES:
                nxt = self._queue.get_nowait()
                if isinstance(nxt, LogChunk) and (nxt.job_id, nxt.phase) == (message.job_id, message.phase):
                    message = LogChunk(message.job_id, message.phase, [*message.lines, *nxt.lines])
                    continue
                self._taken(message)
                yield message
                message = nxt
            self._taken(message)
            yield message

    def _taken(self, message: BackendMessage) -> None:
        if isinstance(message, LogChunk):
            self._inflight.release(_chars(message.lines), len(message.lines))

    async def check(self) -> dict[str, str]:
        problems = {}
        tools = ["buildah", "skopeo", "git", "unshare", "nsenter", "ip"]
        tools += ["slirp4netns"] if self._env["JOBFORGE_BUILD_NETWORK"] == "outbound" else []
        for tool in tools:
            if shutil.which(tool, path=f"{self._env.get('PATH', '')}:/usr/sbin:/sbin") is None:
                problems[tool] = f"{tool} not found on PATH"
        try:
            task_script("build")
        except FileNotFoundError as exc:
            problems["templates"] = str(exc)
        scheme = "https" if self._tls_verify else "http"
        url = f"{scheme}://{self._registry_url}/v2/"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
                async with session.get(url, ssl=None if self._tls_verify else False) as resp:
                    if resp.status not in (200, 401):
                        problems["registry"] = f"{url} answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            problems["registry"] = f"{url} unreachable: {exc.__class__.__name__} {exc}".strip()
        return problems

    async def aclose(self) -> None:
        for run in self._runs.values():
            if run.process is not None and not run.done.is_set():
                run.stopped = True
                await self._terminate(run.process)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ internals

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _secrets(self, phase: str, config: JobConfig) -> dict[str, str]:
        return await self._job_env(phase, config) if self._job_env is not None else {}

    async def _run_phase(self, command: DispatchPhase, payload: dict, config: JobConfig, run: _Run) -> None:
        job_id, phase, attempt = command.job_id, command.phase, command.attempt

        def report(event_cls, **kw) -> None:
            self._queue.put_nowait(JobEvent(job_id, event_cls(phase=phase, attempt=attempt, at=self._clock(), **kw)))

        try:
            secrets = await self._secrets(phase.value, config)
        except SecretReadError as exc:
            self._runs.pop(command.dispatch_key, None)
            run.done.set()
            report(PhaseFailed, error=f"{phase.value} phase could not read its Vault secrets: {exc.message}")
            return
        try:
            outcome = await self._execute(job_id, phase.value, phase.value, payload, run, secrets=secrets,
                                          timeout=command.timeout_seconds, on_start=lambda: report(PhaseStarted),
                                          watch_disks=True)
        except OSError as exc:
            reason = f"no space left on device ({exc})" if exc.errno == errno.ENOSPC else str(exc)
            report(PhaseFailed, error=f"{phase.value} phase could not start: {reason}")
            return
        finally:
            self._runs.pop(command.dispatch_key, None)
        measured = {"usage": outcome.usage, "cache": outcome.cache}  # the phase's end carries them
        if run.stopped:
            report(PhaseFailed, **measured, error=KILLED_BY_USER)
        elif outcome.disk_full_at is not None:
            report(PhaseFailed, **measured, error=f"{phase.value} phase failed: {outcome.disk_full_at}")
        elif outcome.timed_out:
            report(PhaseFailed, **measured,
                   error=f"{phase.value} phase timed out after {format_duration(round(command.timeout_seconds))}")
        elif outcome.returncode == 0:
            report(PhaseSucceeded, **measured)
        else:
            detail = outcome.last_error or f"task exited with code {outcome.returncode}"
            if outcome.disk_full and "no space left on device" not in detail.lower():
                detail = f"no space left on device ({detail})"
            report(PhaseFailed, **measured, error=f"{phase.value} phase failed: {detail}")

    async def _execute(self, job_id: str, log_phase: str, script: str, payload: dict, run: _Run,
                       timeout: float, on_start: Callable[[], None] | None = None,
                       secrets: dict[str, str] | None = None, watch_disks: bool = False) -> _Outcome:
        """`secrets` go into the script's environment only (never argv), and are masked in its output."""
        secrets = secrets or {}
        masks = sorted({v for v in secrets.values() if len(v) >= _MIN_MASKED_CHARS}, key=len, reverse=True)
        workdir = self._work_dir / job_id / f"{log_phase}-{uuid.uuid4().hex[:8]}"
        last_error: list[str] = []
        control = ControlLines(new_nonce())
        try:
            if run.stopped:  # stopped between dispatch and now: never start
                return _Outcome(-1, False, None)
            if self._account is None:
                workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # else the build user's script creates its workdir in its own home: root never writes there.
            env = {**self._env, **secrets, "JOBFORGE_PAYLOAD": "-", "JOBFORGE_WORKDIR": str(workdir),
                   NONCE_ENV: control.nonce}
            proc = await _Child.start([*self._interpreter(), str(task_script(script))], env,
                                      json.dumps(payload).encode(), **self._as_account())
            run.process = proc
            if self._account is None:  # root never writes into the build user's home
                try:
                    (workdir / _PGID_FILE).write_text(str(proc.pid))  # for reap() after a crash of this server
                except OSError:
                    pass
            if run.stopped:  # the stop came while the process was being created
                await self._terminate(proc)
            if on_start:
                on_start()
            pumps = [asyncio.create_task(self._pump(proc.stdout, LogStream.STDOUT, job_id, log_phase, last_error,
                                                    masks, control)),
                     asyncio.create_task(self._pump(proc.stderr, LogStream.STDERR, job_id, log_phase, last_error,
                                                    masks, control))]
            timed_out = False
            disk_full: list[str] = []
            watcher = asyncio.create_task(self._watch_disks(proc, job_id, log_phase, disk_full)) if watch_disks \
                else None
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                timed_out = True
                self._system_line(job_id, log_phase, f"timed out after {format_duration(round(timeout))}; stopping the task")
                await self._terminate(proc)
            finally:
                if watcher is not None:
                    if disk_full:
                        await watcher  # it is stopping the task: let it finish
                    watcher.cancel()
            if run.stopped:
                self._system_line(job_id, log_phase, "stopped: killed by user")
            # Output still buffered in the pipes belongs to this phase: read it all before reporting the end.
            done, pending = await asyncio.wait(pumps, timeout=self._kill_grace)
            for task in pending:
                task.cancel()
            errors = [e for e in last_error if e != _ENOSPC_SEEN]
            return _Outcome(proc.returncode if proc.returncode is not None else -1, timed_out,
                            errors[-1] if errors else None, _ENOSPC_SEEN in last_error or bool(disk_full),
                            disk_full[0] if disk_full else None, usage=proc.usage, cache=control.cache)
        finally:
            run.done.set()
            await self._remove(workdir)

    async def _watch_disks(self, proc: _Child, job_id: str, phase: str,
                           full: list[str]) -> None:
        """Stop the phase when a disk it writes to is full: its writes are failing, maybe silently (a test
        container's output file), and it would otherwise run on to its timeout."""
        while proc.returncode is None:
            for disk in self._disks:
                free = free_bytes(disk)
                if free is not None and free < _DISK_FULL_BYTES:
                    full.append(f"no space left on device: the disk of {disk} is full ({free} bytes free)")
                    self._system_line(job_id, phase, f"[log lines lost: the disk of {disk} is full ({free} bytes "
                                                     "free), what the task wrote there since is gone; stopping "
                                                     "the task]")
                    await self._terminate(proc)
                    return
            await asyncio.sleep(self._disk_poll)

    async def _remove(self, workdir: Path) -> None:
        """The build user's workspace is removed by that user (in its user namespace: files of its sub-uids)."""
        if self._account is None:
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                workdir.parent.rmdir()  # the job's directory goes with its last workspace
            except OSError:
                pass
            return
        proc = await asyncio.create_subprocess_exec(
            "buildah", "unshare", "--", "rm", "-rf", "--", str(workdir), cwd="/", env=self._env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            **self._as_account())
        await proc.wait()

    def _interpreter(self) -> list[str]:
        """The scripts are stdlib-only; the build user runs them with the system python3 (-I: no user site,
        no environment-driven imports), since the service's venv may not be readable by that user."""
        return [self._python] if self._account is None else ["/usr/bin/python3", "-I"]

    def _as_account(self) -> dict:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    async def _pump(self, stream: asyncio.StreamReader, kind: LogStream, job_id: str, phase: str,
                    last_error: list[str], masks: list[str], control: ControlLines) -> None:
        splitter = LineSplitter(self._max_line_bytes)
        while chunk := await stream.read(_READ_CHUNK):
            if pieces := splitter.feed(chunk):
                await self._emit(job_id, phase, kind, pieces, last_error, masks, control)
            await asyncio.sleep(0)  # read() does not suspend while data is buffered: let others run in between
        if pieces := splitter.flush():
            await self._emit(job_id, phase, kind, pieces, last_error, masks, control)

    async def _emit(self, job_id: str, phase: str, kind: LogStream, pieces: list[tuple[bytes, bool]],
                    last_error: list[str], masks: list[str], control: ControlLines) -> None:
        now = self._clock()
        lines = []
        for raw, split in pieces:
            text = decode_piece(raw, split, self._max_line_bytes)
            if kind is LogStream.STDERR and not split and control.take(text):
                continue  # the script's report for the metrics, not part of the job's log
            for secret in masks:  # the phase's own Vault values, should a script or a test print one
                text = text.replace(secret, _MASK)
            if text.startswith(_ERROR_PREFIX) and not split:
                error = text[len(_ERROR_PREFIX):][:_MAX_ERROR_CHARS]
                last_error[:] = [_ENOSPC_SEEN, error] if _ENOSPC_SEEN in last_error else [error]
            elif _ENOSPC_SEEN not in last_error and "no space left on device" in text.lower():
                last_error.insert(0, _ENOSPC_SEEN)
            lines.append(LogLine(ts=now, stream=kind, line=text))
        if not lines:
            return
        await self._inflight.reserve(_chars(lines), len(lines))
        self._queue.put_nowait(LogChunk(job_id, phase, lines))

    def _system_line(self, job_id: str, phase: str, text: str) -> None:
        lines = [LogLine(ts=self._clock(), stream=LogStream.SYSTEM, line=text)]
        self._inflight.add(_chars(lines), len(lines))  # released like any chunk when taken
        self._queue.put_nowait(LogChunk(job_id, phase, lines))

    async def _terminate(self, proc: _Child) -> None:
        """SIGTERM the whole process group, SIGKILL it after the grace period."""
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), self._kill_grace)
        except TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()


def _chars(lines: list[LogLine]) -> int:
    return sum(len(line.line) for line in lines)
