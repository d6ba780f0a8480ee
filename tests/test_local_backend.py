"""The local backend's process hygiene without buildah: a stop before the process exists prevents the start,
leftovers of a crashed server are reaped at start, and workspaces do not outlive their phase; what a phase
consumed is measured by the backend, and only the phase's own nonce makes a control line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from jobforge.backends.base import JobEvent, LogChunk
from jobforge.backends.local import LocalBackend
from jobforge.config import JobConfig
from jobforge.models import Phase
from jobforge.pipeline import (
    KILLED_BY_USER,
    CacheUse,
    DispatchPhase,
    PhaseFailed,
    PhaseStarted,
    PhaseSucceeded,
    StopPhase,
)

CONFIG = JobConfig.model_validate({"owner": "t", "repo_url": "https://git.example.invalid/a.git",
                                   "image_name": "app", "registry_url": "127.0.0.1:5000"})


def backend(tmp_path) -> LocalBackend:
    return LocalBackend(work_dir=tmp_path / "work", storage_root=tmp_path / "nowhere" / "root",
                        storage_runroot=tmp_path / "nowhere" / "runroot", registry_url="127.0.0.1:5000",
                        tls_verify=False, kill_grace=2)


def command(job_id: str = "job-1") -> DispatchPhase:
    return DispatchPhase(job_id=job_id, phase=Phase.BUILD, attempt=1, timeout_seconds=60,
                         resources=CONFIG.resources_for("build"))


async def next_event(b: LocalBackend):
    async for message in b.events():
        if isinstance(message, JobEvent):
            return message.event


async def test_a_stop_before_dispatch_prevents_the_start(tmp_path):
    b = backend(tmp_path)
    cmd = command()
    await b.stop(StopPhase(job_id=cmd.job_id, phase=cmd.phase, attempt=cmd.attempt))
    await b.dispatch(cmd, {"job_id": cmd.job_id}, CONFIG)
    event = await next_event(b)
    assert isinstance(event, PhaseFailed) and event.error == KILLED_BY_USER  # never PhaseStarted
    assert not (tmp_path / "work" / cmd.job_id).exists()
    await b.aclose()


async def test_a_stop_right_after_dispatch_prevents_the_start(tmp_path):
    b = backend(tmp_path)
    cmd = command()
    await b.dispatch(cmd, {"job_id": cmd.job_id}, CONFIG)
    await b.stop(StopPhase(job_id=cmd.job_id, phase=cmd.phase, attempt=cmd.attempt))
    event = await next_event(b)
    assert not isinstance(event, PhaseStarted)
    assert isinstance(event, PhaseFailed) and event.error == KILLED_BY_USER
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    await b.aclose()


async def test_a_phase_leaves_no_workspace(tmp_path):
    b = backend(tmp_path)
    cmd = command()
    await b.dispatch(cmd, {}, CONFIG)  # the task script fails at once: its payload lacks everything
    events = []
    while not isinstance(events[-1] if events else None, PhaseFailed):
        events.append(await next_event(b))
    assert list((tmp_path / "work").iterdir()) == []
    await b.aclose()


# A phase whose child process holds 96 MiB and burns 0.5 s of CPU (the script itself is a shell, which does
# neither), then prints forged reports and the real one (it knows the nonce the backend gave it).
MEASURED_PHASE = f"""#!/bin/sh
{sys.executable} -c 'import time
held = b"x" * (96 << 20)
start = time.process_time()
while time.process_time() - start < 0.5:
    pass'
echo '::jobforge-usage {{"cpu_seconds": 99999, "max_rss_bytes": 1}}' >&2
echo '::jobforge-cache {{"hits": 1000, "misses": 0}}' >&2
echo '::jobforge-0123456789abcdef0123456789abcdef cache {{"hits": 1000, "misses": 0}}' >&2
echo '::jobforge-'"$JOBFORGE_CONTROL_NONCE"' cache {{"hits": 2, "misses": 1}}' >&2
"""


async def test_the_phase_end_carries_what_the_kernel_measured_and_only_the_nonced_report(tmp_path):
    program = tmp_path / "phase.sh"
    program.write_text(MEASURED_PHASE)
    program.chmod(0o755)
    b = LocalBackend(work_dir=tmp_path / "work", storage_root=tmp_path / "nowhere" / "root",
                     storage_runroot=tmp_path / "nowhere" / "runroot", registry_url="127.0.0.1:5000",
                     tls_verify=False, kill_grace=2, python=str(program))
    await b.dispatch(command(), {}, CONFIG)
    lines, end = [], None
    async for message in b.events():
        if isinstance(message, LogChunk):
            lines += [line.line for line in message.lines]
        elif isinstance(message.event, (PhaseSucceeded, PhaseFailed)):
            end = message.event
            break
    await b.aclose()
    assert isinstance(end, PhaseSucceeded), end
    assert end.usage is not None
    assert 0.5 <= end.usage.cpu_seconds < 60
    assert 96 << 20 <= end.usage.memory_peak_bytes < 1 << 30
    assert end.cache == CacheUse(hits=2, misses=1), lines
    assert lines == ['::jobforge-usage {"cpu_seconds": 99999, "max_rss_bytes": 1}',
                     '::jobforge-cache {"hits": 1000, "misses": 0}',
                     '::jobforge-0123456789abcdef0123456789abcdef cache {"hits": 1000, "misses": 0}']


async def test_reap_kills_leftover_phase_groups_and_removes_workspaces(tmp_path):
    workspace = tmp_path / "work" / "job-9" / "build-1234"
    workspace.mkdir(parents=True)
    env = {**os.environ, "JOBFORGE_WORKDIR": str(workspace)}
    # A crashed server's phase: a process group with a child, the leader recorded in the workspace.
    leftover = subprocess.Popen([sys.executable, "-c", "import subprocess,sys; subprocess.Popen(['sleep', '3333']);"
                                 "import time; time.sleep(3333)"], env=env, start_new_session=True)
    (workspace / ".pgid").write_text(str(leftover.pid))
    stranger = subprocess.Popen(["sleep", "3334"], start_new_session=True)
    try:
        await backend(tmp_path).reap()
        assert leftover.wait(10) == -signal.SIGKILL
        assert subprocess.run(["pgrep", "-f", "sleep 3333"], capture_output=True).stdout == b""
        assert stranger.poll() is None, "processes of others are left alone"
        assert list((tmp_path / "work").iterdir()) == []
    finally:
        stranger.kill()
        stranger.wait()
        try:
            os.killpg(leftover.pid, signal.SIGKILL)  # only if reap() failed
        except ProcessLookupError:
            pass


async def test_a_phase_whose_disk_fills_fails_even_when_its_writes_fail_silently(tmp_path):
    """The phase writes into its workspace until the disk is full, ignoring the errors, then waits: it is
    stopped and fails with "no space left on device" naming the disk, long before its timeout."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)  # root in CI
    try:
        program = tmp_path / "phase.sh"
        program.write_text('#!/bin/sh\nwhile :; do echo "a line nobody reads back" >> "$JOBFORGE_WORKDIR/out" '
                           '2>/dev/null; done\n')
        program.chmod(0o755)
        b = LocalBackend(work_dir=disk / "work", storage_root=tmp_path / "nowhere" / "root",
                         storage_runroot=tmp_path / "nowhere" / "runroot", registry_url="127.0.0.1:5000",
                         tls_verify=False, kill_grace=2, python=str(program), disk_poll=0.05)
        await b.dispatch(command(), {}, CONFIG)
        event = await next_event(b)
        while isinstance(event, PhaseStarted):
            event = await next_event(b)
        assert isinstance(event, PhaseFailed)
        assert event.error.startswith(f"build phase failed: no space left on device: the disk of {disk}/work is "
                                      "full ("), event.error
        assert list((disk / "work").iterdir()) == []  # its workspace went, and the space with it
        assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 3 * 1024 * 1024
        await b.aclose()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_flood_of_short_lines_is_held_back_at_the_line_bound(tmp_path):
    """Nobody takes the phase's events: the backend stops reading once 20,000 lines wait (each line is a few
    objects a full garbage collection scans with the loop stopped), so the phase's writes block on its pipe.
    The phase writes without blocking and reports how far it got before its pipe stayed full for 3 s."""
    report = tmp_path / "report"
    program = tmp_path / "phase.py"
    program.write_text(f"""#!{sys.executable}
import os, select, sys
os.set_blocking(1, False)
line, written = b"short line of a flood\\n", 0
while written < 200_000:
    try:
        os.write(1, line)
        written += 1
    except BlockingIOError:
        if not select.select([], [1], [], 3)[1]:
            break
open({str(report)!r}, "w").write(str(written))
""")
    program.chmod(0o755)
    os.mkfifo(report)
    b = LocalBackend(work_dir=tmp_path / "work", storage_root=tmp_path / "nowhere" / "root",
                     storage_runroot=tmp_path / "nowhere" / "runroot", registry_url="127.0.0.1:5000",
                     tls_verify=False, kill_grace=2, python=str(program))
    await b.dispatch(command(), {}, CONFIG)
    # the phase reports itself through a FIFO: stalled, or done when nothing held it back
    written = int(await asyncio.wait_for(asyncio.to_thread(report.read_text), 60))
    # beyond the bound: the pipe (64 KiB) and the stream reader's buffer (asyncio pauses its transport past
    # 128 KiB, after a read of up to 256 KiB): ~21,000 lines of 22 bytes at most
    buffered = (64 + 128 + 256) * 1024 // 22
    assert 20_000 <= written <= 20_000 + buffered, written  # unbounded, all 200,000 would have gone through
    await b.stop(StopPhase(job_id="job-1", phase=Phase.BUILD, attempt=1))
    while not isinstance(await next_event(b), PhaseFailed):
        pass
    await b.aclose()
