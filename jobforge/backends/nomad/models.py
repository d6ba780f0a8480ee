"""The Nomad JSON objects the backend reads, one model each (fields as Nomad names them; unknown fields ignored).

Nomad writes Go zero values as `null` in many places (`Events`, `FailedTGAllocs`, maps): a `null` takes the
field's default here, so code never walks raw dicts or checks for None.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, value: Any) -> Any:
        return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


class TaskEvent(_Wire):
    type: str = Field("", alias="Type")
    display_message: str = Field("", alias="DisplayMessage")
    fails_task: bool = Field(False, alias="FailsTask")
    exit_code: int = Field(0, alias="ExitCode")
    signal: int = Field(0, alias="Signal")
    kill_reason: str = Field("", alias="KillReason")
    driver_error: str = Field("", alias="DriverError")
    setup_error: str = Field("", alias="SetupError")
    validation_error: str = Field("", alias="ValidationError")
    download_error: str = Field("", alias="DownloadError")
    vault_error: str = Field("", alias="VaultError")

    @property
    def error(self) -> str:
        """The first error field the event carries (driver, setup, validation, artifact, Vault)."""
        return (self.driver_error or self.setup_error or self.validation_error or self.download_error
                or self.vault_error)


class TaskState(_Wire):
    state: str = Field("", alias="State")
    failed: bool = Field(False, alias="Failed")
    started_at: datetime | None = Field(None, alias="StartedAt")
    """Go's zero time (year 1) until the task started."""
    events: tuple[TaskEvent, ...] = Field((), alias="Events")

    @property
    def started_ns(self) -> int | None:
        """When the task started, in the client's nanoseconds since the epoch (as stats `Timestamp`s are)."""
        if self.started_at is None or self.started_at.year <= 1:
            return None
        return round(self.started_at.timestamp() * 1_000_000) * 1000


class Allocation(_Wire):
    """An allocation, or its list stub (`/v1/job/:id/allocations`): the fields both carry."""

    id: str = Field(alias="ID")
    job_id: str = Field("", alias="JobID")
    client_status: str = Field("", alias="ClientStatus")
    client_description: str = Field("", alias="ClientDescription")
    desired_status: str = Field("", alias="DesiredStatus")
    desired_description: str = Field("", alias="DesiredDescription")
    task_states: dict[str, TaskState] = Field(default_factory=dict, alias="TaskStates")
    create_index: int = Field(0, alias="CreateIndex")
    modify_index: int = Field(0, alias="ModifyIndex")
    modify_time: int = Field(0, alias="ModifyTime")
    """Nanoseconds since the epoch of the last change Nomad recorded (0 on stubs that lack it)."""

    @property
    def age(self) -> tuple[int, int]:
        """Order by age: Nomad lists allocations in ID order (random), so compare CreateIndex, then ModifyIndex."""
        return self.create_index, self.modify_index

    def events(self, task: str) -> tuple[TaskEvent, ...]:
        state = self.task_states.get(task)
        return state.events if state else ()

    def started_ns(self, task: str) -> int | None:
        state = self.task_states.get(task)
        return state.started_ns if state else None


class MemoryStats(_Wire):
    """Bytes. `Measured` names the fields the driver really sampled ("Max Usage" only under cgroup v1)."""

    rss: int = Field(0, alias="RSS")
    usage: int = Field(0, alias="Usage")
    max_usage: int = Field(0, alias="MaxUsage")
    measured: tuple[str, ...] = Field((), alias="Measured")


class CpuStats(_Wire):
    """Rates over the driver's last sampling period, not totals: `Percent` is 100 per busy core."""

    percent: float = Field(0.0, alias="Percent")
    user_mode: float = Field(0.0, alias="UserMode")
    system_mode: float = Field(0.0, alias="SystemMode")
    total_ticks: float = Field(0.0, alias="TotalTicks")
    measured: tuple[str, ...] = Field((), alias="Measured")


class ResourceUsage(_Wire):
    memory_stats: MemoryStats = Field(default_factory=MemoryStats, alias="MemoryStats")
    cpu_stats: CpuStats = Field(default_factory=CpuStats, alias="CpuStats")


class TaskResourceUsage(_Wire):
    """A task's latest sample (the client samples every second by default, and keeps the last one after the
    task exited until the allocation is garbage-collected)."""

    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage, alias="ResourceUsage")
    timestamp: int = Field(0, alias="Timestamp")
    """The client's nanoseconds since the epoch."""


class AllocResourceUsage(_Wire):
    """`/v1/client/allocation/:id/stats`: the sum over *running* tasks, and each task's latest sample."""

    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage, alias="ResourceUsage")
    tasks: dict[str, TaskResourceUsage] = Field(default_factory=dict, alias="Tasks")
    timestamp: int = Field(0, alias="Timestamp")


class AllocMetric(_Wire):
    """Why a task group was not placed (`Evaluation.FailedTGAllocs[group]`, what `nomad job status` prints)."""

    nodes_evaluated: int = Field(0, alias="NodesEvaluated")
    nodes_filtered: int = Field(0, alias="NodesFiltered")
    nodes_in_pool: int = Field(0, alias="NodesInPool")
    nodes_exhausted: int = Field(0, alias="NodesExhausted")
    nodes_available: dict[str, int] = Field(default_factory=dict, alias="NodesAvailable")
    class_filtered: dict[str, int] = Field(default_factory=dict, alias="ClassFiltered")
    constraint_filtered: dict[str, int] = Field(default_factory=dict, alias="ConstraintFiltered")
    class_exhausted: dict[str, int] = Field(default_factory=dict, alias="ClassExhausted")
    dimension_exhausted: dict[str, int] = Field(default_factory=dict, alias="DimensionExhausted")
    quota_exhausted: tuple[str, ...] = Field((), alias="QuotaExhausted")


class Evaluation(_Wire):
    id: str = Field(alias="ID")
    job_id: str = Field("", alias="JobID")
    status: str = Field("", alias="Status")
    triggered_by: str = Field("", alias="TriggeredBy")
    failed_tg_allocs: dict[str, AllocMetric] = Field(default_factory=dict, alias="FailedTGAllocs")
    create_index: int = Field(0, alias="CreateIndex")
    modify_index: int = Field(0, alias="ModifyIndex")
    modify_time: int = Field(0, alias="ModifyTime")
    """Nanoseconds since the epoch of the last change Nomad recorded (0 on stubs that lack it)."""

    @property
    def age(self) -> tuple[int, int]:
        return self.create_index, self.modify_index


class JobStub(_Wire):
    """A job of `/v1/jobs?meta=true`."""

    id: str = Field(alias="ID")
    meta: dict[str, str] = Field(default_factory=dict, alias="Meta")
    create_index: int = Field(0, alias="CreateIndex")
    modify_index: int = Field(0, alias="ModifyIndex")
    modify_time: int = Field(0, alias="ModifyTime")
    """Nanoseconds since the epoch of the last change Nomad recorded (0 on stubs that lack it)."""

    @property
    def age(self) -> tuple[int, int]:
        return self.create_index, self.modify_index


class DispatchReply(_Wire):
    dispatched_job_id: str = Field(alias="DispatchedJobID")


class StreamEvent(_Wire):
    """One event of the event stream; the payload object of the topics the backend subscribes to."""

    topic: str = Field("", alias="Topic")
    type: str = Field("", alias="Type")
    allocation: Allocation | None = None
    evaluation: Evaluation | None = None

    @model_validator(mode="before")
    @classmethod
    def _payload(cls, value: Any) -> Any:
        if isinstance(value, dict):
            payload = value.get("Payload") or {}
            value = {**value, "allocation": payload.get("Allocation"), "evaluation": payload.get("Evaluation")}
        return value


class EventBatch(_Wire):
    """One line of the event stream: the events of one Raft index, or a `{}` heartbeat (no index)."""

    index: int | None = Field(None, alias="Index")
    events: tuple[StreamEvent, ...] = Field((), alias="Events")
