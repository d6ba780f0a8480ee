"""The fake Nomad's client node: drives placed allocations through the task lifecycle and keeps their logs.

Manual mode (no runner): allocations stay `pending` until the test calls `receive` / `start` / `write` /
`finish` (or `run_alloc`, all of them at once). With a runner hook every placed allocation is driven
automatically: Received + Task Setup, then the task directories are built (NOMAD_ALLOC_DIR, NOMAD_TASK_DIR =
`<task>/local`, NOMAD_SECRETS_DIR), the dispatch payload is written to `local/<DispatchPayload.File>`, every
template is rendered to `<task>/<DestPath>` by consul_template.py, reading secrets from the client's FakeVault with
its root token and `env` from the task environment (`env = true` templates feed the environment),
then Started, then `await runner(run, payload, env)` whose return value is the exit code. The runner appends
output with `run.write(data, "stdout"|"stderr")`, reports resource usage samples with `run.stats(sample)`
(nomad_stats.py; kept per task as the client's latest) and should stop when `run.killed` is set (a job stop or an
alloc stop); after the task's kill_timeout (capped by `kill_timeout`) it is cancelled.

Task event sequences (reference §8): Received -> Task Setup -> Started -> Terminated(exit code) [-> Not
Restarting, failures only]; a stop gives Killing -> Terminated -> Killed (ClientStatus `complete`); a
template that cannot render gives a failing Killing event. Only the first task of a group gets a runner
(our jobs have one); other tasks of the group follow the same states.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.doubles.consul_template import TemplateError, parse_env_file, render_template
from tests.doubles.nomad_shapes import (
    SECOND,
    killed,
    killing,
    not_restarting,
    received,
    rfc3339,
    started,
    task_setup,
    task_state,
    template_failed,
    terminated,
)
from tests.doubles.nomad_state import Cluster
from tests.doubles.nomad_stats import AllocResourceUsage, ProcessSampler, TaskResourceUsage, alloc_stats
from tests.doubles.vault import FakeVault

_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")
EXIT_KILLED = 137  # what a SIGKILLed task reports


@dataclass
class TaskRun:
    """One task of an allocation, as the runner hook sees it."""

    alloc: dict[str, Any]          # the allocation (with its Job), as at start
    task: dict[str, Any]           # the task spec (api JSON)
    alloc_dir: Path                # NOMAD_ALLOC_DIR
    task_dir: Path                 # NOMAD_TASK_DIR (<task>/local)
    secrets_dir: Path              # NOMAD_SECRETS_DIR
    env: dict[str, str]            # the task environment, interpolated
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    write: Callable[..., None] = lambda data, stream="stdout": None
    stats: Callable[[TaskResourceUsage], None] = lambda sample: None
    clock: Callable[[], int] = lambda: 0  # the client's clock (ns), for sample timestamps

    @property
    def name(self) -> str:
        return self.task["Name"]

    @property
    def root(self) -> Path:
        """The task's directory (DestPath of templates is relative to it)."""
        return self.task_dir.parent

    @property
    def config(self) -> dict[str, Any]:
        """The driver config with `${...}` interpolated from the task environment."""
        return interpolate(self.task.get("Config") or {}, self.env)


Runner = Callable[[TaskRun, bytes, dict[str, str]], Awaitable[int]]


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Nomad's client-side interpolation of `${NAME}` (unknown names are left as they are)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: env.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


class Client:
    def __init__(self, cluster: Cluster, *, data_dir: Path, runner: Runner | None = None,
                 vault: FakeVault | None = None, kill_timeout: float = 5.0) -> None:
        self.cluster, self.data_dir, self.runner = cluster, data_dir, runner
        self.vault = vault if vault is not None else FakeVault()  # no secrets: every `secret` read fails
        self.kill_timeout = kill_timeout
        self.logs: dict[tuple[str, str, str], bytearray] = {}
        self.samples: dict[str, dict[str, TaskResourceUsage]] = {}  # alloc -> task -> latest stats sample
        self.driving: dict[str, asyncio.Task[None]] = {}
        self.runs: dict[str, TaskRun] = {}
        self.on_log: Callable[[tuple[str, str, str]], None] = lambda key: None  # (alloc, task, stdout|stderr)
        cluster.on_place, cluster.on_stop = self._placed, self._stop_requested

    # ------------------------------------------------------------ the manual API (each call is one client update)

    def task_names(self, alloc_id: str) -> list[str]:
        return [t["Name"] for t in self._tasks(alloc_id)]

    def _tasks(self, alloc_id: str) -> list[dict[str, Any]]:
        job = self.cluster.alloc_jobs[alloc_id]
        group = self.cluster.allocs[alloc_id]["TaskGroup"]
        return next(g for g in job["TaskGroups"] if g["Name"] == group)["Tasks"]

    def _update(self, alloc_id: str, edit: Callable[[dict[str, Any], int], None]) -> None:
        now = self.cluster.clock()

        def change(alloc: dict[str, Any]) -> None:
            if alloc["TaskStates"] is None:
                alloc["TaskStates"] = {t["Name"]: task_state() for t in self._tasks(alloc_id)}
            for state in alloc["TaskStates"].values():
                edit(state, now)
                del state["Events"][:-10]  # the client keeps the last 10 events per task
        self.cluster.client_update(alloc_id, change)

    def receive(self, alloc_id: str) -> None:
        self._update(alloc_id, lambda s, now: s["Events"].extend([received(now), task_setup(now)]))

    def start(self, alloc_id: str) -> None:
        for task in self._tasks(alloc_id):
            for stream in ("stdout", "stderr"):
                self.logs.setdefault((alloc_id, task["Name"], stream), bytearray())

        def edit(state: dict[str, Any], now: int) -> None:
            state.update(State="running", StartedAt=rfc3339(now))
            state["Events"].append(started(now))
        self._update(alloc_id, edit)

    def write(self, alloc_id: str, data: bytes | str, stream: str = "stdout", task: str | None = None) -> None:
        """Append to a task's stdout/stderr log (the task must have started)."""
        name = task or self._tasks(alloc_id)[0]["Name"]
        self.logs[(alloc_id, name, stream)] += data.encode() if isinstance(data, str) else data
        self.on_log((alloc_id, name, stream))

    def record_stats(self, alloc_id: str, sample: TaskResourceUsage, task: str | None = None) -> None:
        """A task's latest resource usage sample (what the driver's stats channel delivers)."""
        self.samples.setdefault(alloc_id, {})[task or self._tasks(alloc_id)[0]["Name"]] = sample

    def stats(self, alloc_id: str, task_filter: str = "") -> AllocResourceUsage:
        """`/v1/client/allocation/:id/stats` (raises `Refused` as the agent answers)."""
        alloc = self.cluster.allocs.get(alloc_id)
        states = (alloc or {}).get("TaskStates")
        known = alloc is not None and states is not None  # placed but not received: the client has no runner yet
        tasks = [(name, state["State"] == "running") for name, state in (states or {}).items()]
        return alloc_stats(alloc_id, known, known and alloc["ClientStatus"] == "lost", tasks,
                           self.samples.get(alloc_id, {}), task_filter)

    def finish(self, alloc_id: str, exit_code: int = 0) -> None:
        def edit(state: dict[str, Any], now: int) -> None:
            state.update(State="dead", Failed=exit_code != 0, FinishedAt=rfc3339(now))
            state["Events"].append(terminated(now, exit_code))
            if exit_code != 0:
                state["Events"].append(not_restarting(now))
        self._update(alloc_id, edit)

    def run_alloc(self, alloc_id: str, stdout: bytes = b"", stderr: bytes = b"", exit_code: int = 0) -> None:
        states = self.cluster.allocs[alloc_id]["TaskStates"]
        if states is None:
            self.receive(alloc_id)
        if all(s["StartedAt"] is None for s in (self.cluster.allocs[alloc_id]["TaskStates"] or {}).values()):
            self.start(alloc_id)
        if stdout:
            self.write(alloc_id, stdout, "stdout")
        if stderr:
            self.write(alloc_id, stderr, "stderr")
        self.finish(alloc_id, exit_code)

    def kill(self, alloc_id: str, exit_code: int | None = 143, *, announce: bool = True) -> None:
        """The server stopped the alloc: Killing, Terminated (if the task ran), Killed."""
        alloc = self.cluster.allocs[alloc_id]
        if alloc["ClientStatus"] in ("complete", "failed", "lost"):
            return
        timeout = (self._tasks(alloc_id)[0].get("KillTimeout") or 5 * SECOND)
        if announce:
            self._update(alloc_id, lambda s, now: s["Events"].append(killing(now, timeout)))

        def edit(state: dict[str, Any], now: int) -> None:
            if state["StartedAt"] is not None and state["State"] != "dead" and exit_code is not None:
                state["Events"].append(terminated(now, exit_code))
            state.update(State="dead", Failed=False, FinishedAt=rfc3339(now))
            state["Events"].append(killed(now))
        self._update(alloc_id, edit)

    def fail_template(self, alloc_id: str, error: str) -> None:
        """The template hook's kill: `Killing` (FailsTask, "Template failed: <err>"), the task dead and failed."""
        def edit(state: dict[str, Any], now: int) -> None:
            state.update(State="dead", Failed=True, FinishedAt=rfc3339(now))
            state["Events"].append(template_failed(now, error))
        self._update(alloc_id, edit)

    # ------------------------------------------------------------ scheduler callbacks

    def _placed(self, alloc_id: str) -> None:
        if self.runner is not None:
            self.driving[alloc_id] = asyncio.get_running_loop().create_task(self._drive(alloc_id))

    def _stop_requested(self, alloc_id: str) -> None:
        run, task = self.runs.get(alloc_id), self.driving.get(alloc_id)
        if task is not None and not task.done():
            if run is not None:
                run.killed.set()
            else:
                task.cancel()  # not started yet: nothing to wait for
                if self.cluster.allocs[alloc_id]["ClientStatus"] != "lost":
                    self.kill(alloc_id, None)
        elif self.cluster.allocs[alloc_id]["ClientStatus"] != "lost":
            self.kill(alloc_id)

    # ------------------------------------------------------------ the automatic runner

    async def _drive(self, alloc_id: str) -> None:
        self.receive(alloc_id)
        try:
            run, payload = self._prepare(alloc_id)
        except TemplateError as exc:
            self.fail_template(alloc_id, str(exc))
            return
        self.runs[alloc_id] = run
        self.start(alloc_id)
        assert self.runner is not None
        work = asyncio.ensure_future(self.runner(run, payload, dict(run.env)))
        stop = asyncio.ensure_future(run.killed.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                lost = self.cluster.allocs[alloc_id]["ClientStatus"] == "lost"
                timeout = min((run.task.get("KillTimeout") or 5 * SECOND) / SECOND, self.kill_timeout)
                if not lost:
                    self._update(alloc_id, lambda s, now: s["Events"].append(
                        killing(now, run.task.get("KillTimeout") or 5 * SECOND)))
                done, _ = await asyncio.wait({work}, timeout=0 if lost else timeout)
                if not done:
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                if not lost:
                    self.kill(alloc_id, _exit_code(work), announce=False)
            elif run.killed.is_set():  # the task exited as soon as it was told to
                self.kill(alloc_id, _exit_code(work))
            else:
                self.finish(alloc_id, _exit_code(work))
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    def _prepare(self, alloc_id: str) -> tuple[TaskRun, bytes]:
        alloc = self.cluster.alloc_view(self.cluster.allocs[alloc_id])
        job = self.cluster.alloc_jobs[alloc_id]
        payload = self.cluster.payloads.get((job["Namespace"], job["ID"]), b"")
        root = self.data_dir / alloc_id
        alloc_dir = root / "alloc"
        for sub in ("logs", "data", "tmp"):
            (alloc_dir / sub).mkdir(parents=True, exist_ok=True)
        runs = []
        for task in self._tasks(alloc_id):
            task_root = root / task["Name"]
            dirs = {name: task_root / name for name in ("local", "secrets", "tmp")}
            for path in dirs.values():
                path.mkdir(parents=True, exist_ok=True)
            env = self._environment(alloc, job, task, alloc_dir, dirs["local"], dirs["secrets"])
            if task.get("DispatchPayload") and task["DispatchPayload"].get("File"):
                (dirs["local"] / task["DispatchPayload"]["File"]).write_bytes(payload)
            for tmpl in task.get("Templates") or []:
                text = render_template(tmpl.get("EmbeddedTmpl") or "", self.vault, env=env)
                target = task_root / tmpl["DestPath"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                target.chmod(int(tmpl.get("Perms") or "0644", 8))
                if tmpl.get("Envvars"):
                    env.update(parse_env_file(text))
            runs.append(TaskRun(alloc=alloc, task=task, alloc_dir=alloc_dir, task_dir=dirs["local"],
                                secrets_dir=dirs["secrets"], env=env,
                                write=lambda data, stream="stdout", _t=task["Name"]: self.write(alloc_id, data,
                                                                                                stream, _t),
                                stats=lambda sample, _t=task["Name"]: self.record_stats(alloc_id, sample, _t),
                                clock=self.cluster.clock))
        return runs[0], payload

    def _environment(self, alloc: dict[str, Any], job: dict[str, Any], task: dict[str, Any], alloc_dir: Path,
                     task_dir: Path, secrets_dir: Path) -> dict[str, str]:
        resources = task.get("Resources") or {}
        env = {"NOMAD_ALLOC_DIR": str(alloc_dir), "NOMAD_TASK_DIR": str(task_dir),
               "NOMAD_SECRETS_DIR": str(secrets_dir), "NOMAD_ALLOC_ID": alloc["ID"],
               "NOMAD_SHORT_ALLOC_ID": alloc["ID"][:8], "NOMAD_ALLOC_NAME": alloc["Name"],
               "NOMAD_ALLOC_INDEX": alloc["Name"].rsplit("[", 1)[-1].rstrip("]"),
               "NOMAD_GROUP_NAME": alloc["TaskGroup"], "NOMAD_TASK_NAME": task["Name"], "NOMAD_JOB_ID": job["ID"],
               "NOMAD_JOB_NAME": job["Name"], "NOMAD_JOB_PARENT_ID": job["ParentID"] or "",
               "NOMAD_DC": self.cluster.datacenter, "NOMAD_REGION": job["Region"],
               "NOMAD_NAMESPACE": job["Namespace"], "NOMAD_CPU_LIMIT": str(resources.get("CPU") or 0),
               "NOMAD_MEMORY_LIMIT": str(resources.get("MemoryMB") or 0)}
        for key, value in (job.get("Meta") or {}).items():
            env[f"NOMAD_META_{key}"] = env[f"NOMAD_META_{key.upper()}"] = value
        lookup = {**env, **{f"meta.{k}": v for k, v in (job.get("Meta") or {}).items()},
                  "node.datacenter": self.cluster.datacenter, "node.unique.name": self.cluster.node_name,
                  "node.unique.id": self.cluster.node_id,
                  **{f"attr.{k}": v for k, v in self.cluster.node.attributes.items()}}
        env.update(interpolate(task.get("Env") or {}, lookup))
        return env

    async def aclose(self) -> None:
        tasks = [t for t in self.driving.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    async def settle(self) -> None:
        """Wait until every automatically driven allocation has finished."""
        while pending := [t for t in self.driving.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)


def _exit_code(work: asyncio.Future[int]) -> int:
    if work.cancelled():
        return EXIT_KILLED
    if work.exception() is not None:
        return 1
    return int(work.result())


def subprocess_runner(*, python: str | None = sys.executable, extra_env: Mapping[str, str] | None = None,
                      stats_interval: float = 1.0) -> Runner:
    """A runner that plays the docker driver on this host: runs the task's `config.command` + `args` (with
    `python3` replaced by `python`), cwd = the task directory, env = the task environment + PATH, stdout and
    stderr streamed into the logs, the process tree's usage sampled every `stats_interval` seconds while it runs
    (Nomad's default collection interval); `run.killed` sends SIGTERM to the process group."""

    async def run(task: TaskRun, payload: bytes, env: dict[str, str]) -> int:
        config = task.config
        argv = [config["command"], *config.get("args", [])]
        if python and argv[0] in ("python3", "python"):
            argv[0] = python
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=str(task.root), start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, **(extra_env or {})})

        async def pump(stream: asyncio.StreamReader | None, name: str) -> None:
            while stream is not None and (chunk := await stream.read(65536)):
                task.write(chunk, name)

        async def collect(sampler: ProcessSampler) -> None:
            while (taken := sampler.take()) is not None:
                task.stats(taken)
                await asyncio.sleep(stats_interval)  # the collection interval, as the client's stats hook

        pumps = asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
        waiter, stop = asyncio.ensure_future(proc.wait()), asyncio.ensure_future(task.killed.wait())
        collector = asyncio.ensure_future(collect(ProcessSampler(proc.pid, task.clock)))
        waiter.add_done_callback(lambda _: collector.cancel())  # the stats hook stops when the task exits
        try:
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                os.killpg(proc.pid, signal.SIGTERM)
            code = await waiter
            await pumps
        except asyncio.CancelledError:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            raise
        finally:
            stop.cancel()
            collector.cancel()
        return code if code >= 0 else 128 - code

    return run
