"""Job specs for the fake Nomad: the API job JSON (decode + Canonicalize) and HCL -> JSON (`/v1/jobs/parse`).

- `decode_job(raw)` does what Go's encoding/json does with a request body's `Job`: keys match field names
  case-insensitively, unknown keys are dropped, every field of the struct is present (missing -> null).
  Field lists are the api structs' (shared/reference/nomad-samples/json-job-example.json for Job, TaskGroup,
  Task and Resources; api/tasks.go for the rest).
- `canonicalize(job)` fills the defaults of api.Job.Canonicalize (api/jobs.go, api/tasks.go, api/resources.go)
  for the fields our jobs use: job Region/Namespace/Priority/Type/..., group Count, EphemeralDisk,
  RestartPolicy and ReschedulePolicy by job type, task KillTimeout, LogConfig, Resources (100 MHz / 300 MB),
  Template and Vault defaults, device Count. Update/Migrate strategies of service jobs are not filled.
- `parse_hcl(text)` converts the HCL2 blocks of nomad-jobs/*.hcl (job, meta, parameterized, periodic, group,
  restart, reschedule, ephemeral_disk, volume, constraint, task, config, dispatch_payload, volume_mount, env,
  template, resources, device, vault, logs, lifecycle; and for the service's own job: update, migrate, network,
  port, service, check) with python-hcl2, decoding string escapes the way
  HashiCorp's HCL does (`$${` -> `${`, `%%{` -> `%{`, heredocs keep their final newline, `<<-` is dedented).
  `${...}` interpolations stay literal, as Nomad leaves runtime variables for the client. Not supported (400):
  HCL variables/locals/functions and blocks outside that list.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import hcl2
from lark.exceptions import LarkError

from tests.doubles.nomad_shapes import SECOND, Refused, parse_duration


class Struct(str):
    """A field holding one nested struct of that name."""


class ListOf(str):
    """A field holding a list of structs of that name."""


class MapOf(str):
    """A field holding a map of name -> struct."""


_ = None  # a plain field: any JSON value, kept as given
SCHEMA: dict[str, dict[str, Any]] = {
    "Job": {"Region": _, "Namespace": _, "ID": _, "Name": _, "Type": _, "Priority": _, "AllAtOnce": _,
            "Datacenters": _, "NodePool": _, "Constraints": ListOf("Constraint"), "Affinities": _,
            "TaskGroups": ListOf("TaskGroup"), "Update": Struct("UpdateStrategy"), "Multiregion": _, "Spreads": _,
            "Periodic": Struct("PeriodicConfig"), "ParameterizedJob": Struct("ParameterizedJobConfig"),
            "Reschedule": Struct("ReschedulePolicy"), "Migrate": Struct("MigrateStrategy"), "Meta": _, "ConsulToken": _, "VaultToken": _,
            "Stop": _, "ParentID": _, "Dispatched": _, "DispatchIdempotencyToken": _, "Payload": _,
            "ConsulNamespace": _, "VaultNamespace": _, "NomadTokenID": _, "Status": _, "StatusDescription": _,
            "Stable": _, "Version": _, "SubmitTime": _, "CreateIndex": _, "ModifyIndex": _, "JobModifyIndex": _},
    "TaskGroup": {"Name": _, "Count": _, "Constraints": ListOf("Constraint"), "Affinities": _,
                  "Tasks": ListOf("Task"), "Spreads": _, "Volumes": MapOf("VolumeRequest"),
                  "RestartPolicy": Struct("RestartPolicy"), "ReschedulePolicy": Struct("ReschedulePolicy"),
                  "EphemeralDisk": Struct("EphemeralDisk"), "Update": Struct("UpdateStrategy"),
                  "Migrate": Struct("MigrateStrategy"), "Networks": ListOf("NetworkResource"), "Meta": _,
                  "Services": ListOf("Service"), "ShutdownDelay": _, "StopAfterClientDisconnect": _, "MaxClientDisconnect": _,
                  "Scaling": _, "Consul": _},
    "Task": {"Name": _, "Driver": _, "User": _, "Lifecycle": _, "Config": _, "Constraints": ListOf("Constraint"),
             "Affinities": _, "Env": _, "Services": _, "Resources": Struct("Resources"),
             "RestartPolicy": Struct("RestartPolicy"), "Meta": _, "KillTimeout": _,
             "LogConfig": Struct("LogConfig"), "Artifacts": _, "Vault": Struct("Vault"),
             "Templates": ListOf("Template"), "DispatchPayload": Struct("DispatchPayloadConfig"),
             "VolumeMounts": ListOf("VolumeMount"), "Leader": _, "ShutdownDelay": _, "KillSignal": _, "Kind": _,
             "ScalingPolicies": _, "Identity": _},
    "Resources": {"CPU": _, "Cores": _, "MemoryMB": _, "MemoryMaxMB": _, "DiskMB": _, "Networks": _,
                  "Devices": ListOf("RequestedDevice"), "IOPS": _},
    "RequestedDevice": {"Name": _, "Count": _, "Constraints": ListOf("Constraint"), "Affinities": _},
    "Constraint": {"LTarget": _, "RTarget": _, "Operand": _},
    "RestartPolicy": {"Interval": _, "Attempts": _, "Delay": _, "Mode": _, "RenderTemplates": _},
    "ReschedulePolicy": {"Attempts": _, "Interval": _, "Delay": _, "DelayFunction": _, "MaxDelay": _,
                         "Unlimited": _},
    "EphemeralDisk": {"Sticky": _, "Migrate": _, "SizeMB": _},
    "VolumeRequest": {"Name": _, "Type": _, "Source": _, "ReadOnly": _, "AccessMode": _, "AttachmentMode": _,
                      "MountOptions": _, "PerAlloc": _},
    "VolumeMount": {"Volume": _, "Destination": _, "ReadOnly": _, "PropagationMode": _, "SELinuxLabel": _},
    "Template": {"SourcePath": _, "DestPath": _, "EmbeddedTmpl": _, "ChangeMode": _, "ChangeScript": _,
                 "ChangeSignal": _, "Splay": _, "Perms": _, "Uid": _, "Gid": _, "LeftDelim": _, "RightDelim": _,
                 "Envvars": _, "VaultGrace": _, "Wait": _, "ErrMissingKey": _, "Once": _},
    "Vault": {"Policies": _, "Role": _, "Namespace": _, "Cluster": _, "Env": _, "DisableFile": _,
              "ChangeMode": _, "ChangeSignal": _, "AllowTokenExpiration": _},
    "DispatchPayloadConfig": {"File": _},
    "ParameterizedJobConfig": {"Payload": _, "MetaRequired": _, "MetaOptional": _},
    "PeriodicConfig": {"Enabled": _, "Spec": _, "Specs": _, "SpecType": _, "ProhibitOverlap": _, "TimeZone": _},
    "LogConfig": {"MaxFiles": _, "MaxFileSizeMB": _, "Disabled": _},
    "UpdateStrategy": {"Stagger": _, "MaxParallel": _, "HealthCheck": _, "MinHealthyTime": _,
                       "HealthyDeadline": _, "ProgressDeadline": _, "Canary": _, "AutoRevert": _,
                       "AutoPromote": _},
    "MigrateStrategy": {"MaxParallel": _, "HealthCheck": _, "MinHealthyTime": _, "HealthyDeadline": _},
    "NetworkResource": {"Mode": _, "Device": _, "CIDR": _, "IP": _, "DNS": _, "ReservedPorts": ListOf("Port"),
                        "DynamicPorts": ListOf("Port"), "Hostname": _, "MBits": _},
    "Port": {"Label": _, "Value": _, "To": _, "HostNetwork": _},
    "Service": {"Name": _, "Tags": _, "CanaryTags": _, "EnableTagOverride": _, "PortLabel": _,
                "AddressMode": _, "Address": _, "Checks": ListOf("ServiceCheck"), "CheckRestart": _,
                "Connect": _, "Meta": _, "CanaryMeta": _, "TaggedAddresses": _, "TaskName": _, "OnUpdate": _,
                "Identity": _, "Provider": _, "Cluster": _},
    "ServiceCheck": {"Name": _, "Type": _, "Command": _, "Args": _, "Path": _, "Protocol": _, "PortLabel": _,
                     "Expose": _, "AddressMode": _, "Interval": _, "Timeout": _, "InitialStatus": _,
                     "TLSServerName": _, "TLSSkipVerify": _, "Header": _, "Method": _, "CheckRestart": _,
                     "GRPCService": _, "GRPCUseTLS": _, "TaskName": _, "SuccessBeforePassing": _,
                     "FailuresBeforeCritical": _, "FailuresBeforeWarning": _, "Body": _, "OnUpdate": _},
}
# Fields that are not pointers in the api structs: Go encodes their zero value, never null.
ZERO: dict[str, dict[str, Any]] = {
    "Job": {"Dispatched": False},
    "Task": {"Name": "", "Driver": "", "User": "", "Leader": False, "ShutdownDelay": 0, "KillSignal": "", "Kind": ""},
    "Constraint": {"LTarget": "", "RTarget": "", "Operand": ""},
    "ParameterizedJobConfig": {"Payload": ""},
    "DispatchPayloadConfig": {"File": ""},
    "VolumeRequest": {"Name": "", "Type": "", "Source": "", "ReadOnly": False, "AccessMode": "",
                      "AttachmentMode": "", "PerAlloc": False},
    "RequestedDevice": {"Name": ""},
    "Vault": {"Role": "", "Cluster": ""},
    "Port": {"Label": "", "Value": 0, "To": 0, "HostNetwork": ""},
    "NetworkResource": {"Mode": "", "Device": "", "CIDR": "", "IP": "", "Hostname": "", "MBits": 0},
    "Service": {"Name": "", "EnableTagOverride": False, "PortLabel": "", "AddressMode": "", "Address": "",
                "TaskName": "", "OnUpdate": "", "Provider": "", "Cluster": ""},
    "ServiceCheck": {"Name": "", "Type": "", "Command": "", "Path": "", "Protocol": "", "PortLabel": "",
                     "Expose": False, "AddressMode": "", "Interval": 0, "Timeout": 0, "InitialStatus": "",
                     "TLSServerName": "", "TLSSkipVerify": False, "Method": "", "GRPCService": "",
                     "GRPCUseTLS": False, "TaskName": "", "SuccessBeforePassing": 0, "FailuresBeforeCritical": 0,
                     "FailuresBeforeWarning": 0, "Body": "", "OnUpdate": ""},
}
_TYPE_NAMES = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}


def decode(kind: str, raw: Any, path: str = "") -> dict[str, Any] | None:
    """`raw` as Go decodes it into api.<kind>; a non-object raises Refused(400) with Go's message."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        got = _TYPE_NAMES.get(type(raw), "value")
        raise Refused(400, f"json: cannot unmarshal {got} into Go struct field {path or kind} of type api.{kind}")
    lowered = {k.lower(): k for k in raw}
    out: dict[str, Any] = {}
    for name, field_type in SCHEMA[kind].items():
        key = name if name in raw else lowered.get(name.lower())
        value = raw.get(key) if key is not None else None
        where = f"{path or kind}.{name}"
        if value is None:
            out[name] = ZERO.get(kind, {}).get(name)
        elif field_type is None:
            out[name] = copy.deepcopy(value)
        elif isinstance(field_type, ListOf):
            if not isinstance(value, list):
                raise Refused(400, f"json: cannot unmarshal {_TYPE_NAMES.get(type(value), 'value')} into Go "
                                   f"struct field {where} of type []*api.{field_type}")
            out[name] = [decode(field_type, item, where) for item in value]
        elif isinstance(field_type, MapOf):
            out[name] = {k: decode(field_type, v, where) for k, v in value.items()}
        else:
            out[name] = decode(field_type, value, where)
    return out


def decode_job(raw: Any) -> dict[str, Any]:
    return decode("Job", raw, "JobRegisterRequest.Job")  # type: ignore[return-value]


# ---------------------------------------------------------------- Canonicalize (api package)

def _defaults(target: dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        if target.get(key) is None:
            target[key] = value


def _restart_default(job_type: str) -> dict[str, Any]:
    if job_type in ("service", "system"):
        return {"Interval": 1800 * SECOND, "Attempts": 2, "Delay": 15 * SECOND, "Mode": "fail",
                "RenderTemplates": False}
    return {"Interval": 24 * 3600 * SECOND, "Attempts": 3, "Delay": 15 * SECOND, "Mode": "fail",
            "RenderTemplates": False}


def _reschedule_default(job_type: str) -> dict[str, Any] | None:
    if job_type == "service":
        return {"Attempts": 0, "Interval": 0, "Delay": 30 * SECOND, "DelayFunction": "exponential",
                "MaxDelay": 3600 * SECOND, "Unlimited": True}
    if job_type == "batch":
        return {"Attempts": 1, "Interval": 24 * 3600 * SECOND, "Delay": 5 * SECOND, "DelayFunction": "constant",
                "MaxDelay": 0, "Unlimited": False}
    return None


def _merged(base: dict[str, Any] | None, *overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    out = dict(base) if base is not None else None
    for override in overrides:
        if override is not None:
            out = {**(out or {}), **{k: v for k, v in override.items() if v is not None}}
    return out


def canonicalize(job: dict[str, Any]) -> dict[str, Any]:
    """api.Job.Canonicalize on a decoded job (in place; also returned)."""
    _defaults(job, ID="")
    _defaults(job, Name=job["ID"], ParentID="", Namespace="default", Priority=50, Stop=False, Region="global",
              NodePool="", Type="service", AllAtOnce=False, ConsulToken="", ConsulNamespace="", VaultToken="",
              VaultNamespace="", NomadTokenID="", Status="", StatusDescription="", Stable=False, Version=0,
              CreateIndex=0, ModifyIndex=0, JobModifyIndex=0)
    if job.get("Periodic") is not None:
        _defaults(job["Periodic"], Enabled=True, Spec="", SpecType="cron", ProhibitOverlap=False, TimeZone="UTC")
    for group in job.get("TaskGroups") or []:
        _canonical_group(group, job)
    return job


def _canonical_group(group: dict[str, Any], job: dict[str, Any]) -> None:
    _defaults(group, Name="", Count=1)
    group["EphemeralDisk"] = _merged({"Sticky": False, "Migrate": False, "SizeMB": 300}, group["EphemeralDisk"])
    group["RestartPolicy"] = _merged(_restart_default(job["Type"]), group["RestartPolicy"])
    reschedule = _reschedule_default(job["Type"])
    if reschedule is not None:
        group["ReschedulePolicy"] = _merged(reschedule, job.get("Reschedule"), group["ReschedulePolicy"])
    for task in group.get("Tasks") or []:
        _canonical_task(task, group)


def _canonical_task(task: dict[str, Any], group: dict[str, Any]) -> None:
    resources = task["Resources"] = task.get("Resources") or decode("Resources", {})
    if resources["Cores"] is None:
        resources["Cores"] = 0
        _defaults(resources, CPU=100)
    _defaults(resources, CPU=0, MemoryMB=300)
    for device in resources.get("Devices") or []:
        _defaults(device, Count=1)
    task["RestartPolicy"] = _merged(group["RestartPolicy"], task["RestartPolicy"])
    _defaults(task, KillTimeout=5 * SECOND, Leader=False, ShutdownDelay=0, KillSignal="")
    task["LogConfig"] = _merged({"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False}, task["LogConfig"])
    if task.get("Vault") is not None:
        _defaults(task["Vault"], Env=True, DisableFile=False, Namespace="", ChangeMode="restart",
                  ChangeSignal="SIGHUP", AllowTokenExpiration=False)
        task["Vault"]["Cluster"] = task["Vault"]["Cluster"] or "default"
    for tmpl in task.get("Templates") or []:
        _defaults(tmpl, SourcePath="", DestPath="", EmbeddedTmpl="", ChangeMode="restart")
        signal = tmpl.get("ChangeSignal")
        tmpl["ChangeSignal"] = signal.upper() if signal else ("SIGHUP" if tmpl["ChangeMode"] == "signal" else "")
        _defaults(tmpl, Splay=5 * SECOND, Perms="0644", LeftDelim="{{", RightDelim="}}", Envvars=False,
                  ErrMissingKey=False, Once=False)


# ---------------------------------------------------------------- HCL2 -> api.Job

_HCL_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=True, preserve_heredocs=True,
                                         strip_string_quotes=False)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_HEREDOC = re.compile(r"^<<(-?)([A-Za-z_][A-Za-z0-9_-]*)\n(.*)\n[ \t]*\2$", re.DOTALL)
DURATION = object()  # marker: an HCL duration string that becomes nanoseconds in JSON

# block name -> {hcl attribute -> api field (or (api field, DURATION))}
_ATTRS: dict[str, dict[str, Any]] = {
    "job": {"region": "Region", "namespace": "Namespace", "id": "ID", "name": "Name", "type": "Type",
            "priority": "Priority", "all_at_once": "AllAtOnce", "datacenters": "Datacenters",
            "node_pool": "NodePool", "vault_token": "VaultToken", "consul_token": "ConsulToken"},
    "parameterized": {"payload": "Payload", "meta_required": "MetaRequired", "meta_optional": "MetaOptional"},
    "periodic": {"cron": "Spec", "crons": "Specs", "enabled": "Enabled", "prohibit_overlap": "ProhibitOverlap",
                 "time_zone": "TimeZone"},
    "group": {"count": "Count", "shutdown_delay": ("ShutdownDelay", DURATION),
              "stop_after_client_disconnect": ("StopAfterClientDisconnect", DURATION),
              "max_client_disconnect": ("MaxClientDisconnect", DURATION)},
    "restart": {"attempts": "Attempts", "interval": ("Interval", DURATION), "delay": ("Delay", DURATION),
                "mode": "Mode", "render_templates": "RenderTemplates"},
    "reschedule": {"attempts": "Attempts", "interval": ("Interval", DURATION), "delay": ("Delay", DURATION),
                   "delay_function": "DelayFunction", "max_delay": ("MaxDelay", DURATION),
                   "unlimited": "Unlimited"},
    "ephemeral_disk": {"sticky": "Sticky", "migrate": "Migrate", "size": "SizeMB"},
    "volume": {"type": "Type", "source": "Source", "read_only": "ReadOnly", "access_mode": "AccessMode",
               "attachment_mode": "AttachmentMode", "per_alloc": "PerAlloc"},
    "constraint": {"attribute": "LTarget", "operator": "Operand", "value": "RTarget"},
    "task": {"driver": "Driver", "user": "User", "kill_timeout": ("KillTimeout", DURATION),
             "kill_signal": "KillSignal", "leader": "Leader", "shutdown_delay": ("ShutdownDelay", DURATION),
             "kind": "Kind"},
    "resources": {"cpu": "CPU", "cores": "Cores", "memory": "MemoryMB", "memory_max": "MemoryMaxMB"},
    "device": {"count": "Count"},
    "dispatch_payload": {"file": "File"},
    "volume_mount": {"volume": "Volume", "destination": "Destination", "read_only": "ReadOnly",
                     "propagation_mode": "PropagationMode", "selinux_label": "SELinuxLabel"},
    "template": {"source": "SourcePath", "destination": "DestPath", "data": "EmbeddedTmpl",
                 "change_mode": "ChangeMode", "change_signal": "ChangeSignal", "splay": ("Splay", DURATION),
                 "perms": "Perms", "uid": "Uid", "gid": "Gid", "left_delimiter": "LeftDelim",
                 "right_delimiter": "RightDelim", "env": "Envvars", "error_on_missing_key": "ErrMissingKey",
                 "once": "Once", "vault_grace": ("VaultGrace", DURATION)},
    "vault": {"policies": "Policies", "role": "Role", "namespace": "Namespace", "cluster": "Cluster",
              "env": "Env", "disable_file": "DisableFile", "change_mode": "ChangeMode",
              "change_signal": "ChangeSignal", "allow_token_expiration": "AllowTokenExpiration"},
    "logs": {"max_files": "MaxFiles", "max_file_size": "MaxFileSizeMB", "disabled": "Disabled"},
    "lifecycle": {"hook": "Hook", "sidecar": "Sidecar"},
    "update": {"stagger": ("Stagger", DURATION), "max_parallel": "MaxParallel", "health_check": "HealthCheck",
               "min_healthy_time": ("MinHealthyTime", DURATION), "healthy_deadline": ("HealthyDeadline", DURATION),
               "progress_deadline": ("ProgressDeadline", DURATION), "canary": "Canary", "auto_revert": "AutoRevert",
               "auto_promote": "AutoPromote"},
    "migrate": {"max_parallel": "MaxParallel", "health_check": "HealthCheck",
                "min_healthy_time": ("MinHealthyTime", DURATION), "healthy_deadline": ("HealthyDeadline", DURATION)},
    "network": {"mode": "Mode", "hostname": "Hostname"},
    "port": {"static": "Value", "to": "To", "host_network": "HostNetwork"},
    "service": {"name": "Name", "port": "PortLabel", "tags": "Tags", "canary_tags": "CanaryTags",
                "provider": "Provider", "address_mode": "AddressMode", "address": "Address", "task": "TaskName",
                "enable_tag_override": "EnableTagOverride", "on_update": "OnUpdate"},
    "check": {"name": "Name", "type": "Type", "path": "Path", "port": "PortLabel", "protocol": "Protocol",
              "interval": ("Interval", DURATION), "timeout": ("Timeout", DURATION), "method": "Method",
              "command": "Command", "args": "Args", "initial_status": "InitialStatus", "body": "Body",
              "address_mode": "AddressMode", "tls_skip_verify": "TLSSkipVerify", "on_update": "OnUpdate"},
}
# block name -> {child block -> (api field, how)}: "one" = a struct, "list" = appended, "map" = a string map
_BLOCKS: dict[str, dict[str, tuple[str, str]]] = {
    "job": {"meta": ("Meta", "map"), "parameterized": ("ParameterizedJob", "one"), "periodic": ("Periodic", "one"),
            "group": ("TaskGroups", "list"), "constraint": ("Constraints", "list"),
            "reschedule": ("Reschedule", "one"), "vault": ("Vault", "inherit"), "update": ("Update", "one"),
            "migrate": ("Migrate", "one")},
    "group": {"meta": ("Meta", "map"), "restart": ("RestartPolicy", "one"), "update": ("Update", "one"),
              "migrate": ("Migrate", "one"), "network": ("Networks", "list"), "service": ("Services", "list"),
              "reschedule": ("ReschedulePolicy", "one"), "ephemeral_disk": ("EphemeralDisk", "one"),
              "volume": ("Volumes", "labeled"), "constraint": ("Constraints", "list"), "task": ("Tasks", "list"),
              "vault": ("Vault", "inherit")},
    "task": {"config": ("Config", "raw"), "env": ("Env", "map"), "meta": ("Meta", "map"),
             "resources": ("Resources", "one"), "dispatch_payload": ("DispatchPayload", "one"),
             "volume_mount": ("VolumeMounts", "list"), "template": ("Templates", "list"),
             "vault": ("Vault", "one"), "constraint": ("Constraints", "list"), "logs": ("LogConfig", "one"),
             "restart": ("RestartPolicy", "one"), "lifecycle": ("Lifecycle", "one")},
    "resources": {"device": ("Devices", "list")},
    "network": {"port": ("DynamicPorts", "port")},
    "service": {"check": ("Checks", "list"), "meta": ("Meta", "map")},
    "device": {"constraint": ("Constraints", "list")},
}
_LABELS = {"job": "ID", "group": "Name", "task": "Name", "device": "Name", "volume": "Name", "port": "Label"}


def _bad(message: str) -> Refused:
    return Refused(400, f"Failed to parse job: input.hcl: {message}")


def decode_quoted(raw: str) -> str:
    """A quoted HCL string literal (source text, quotes included) -> its value."""
    body, out, i = raw[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            width = {"u": 4, "U": 8}.get(nxt)
            if width:
                out.append(chr(int(body[i + 2:i + 2 + width], 16)))
                i += 2 + width
                continue
            raise _bad(f"Invalid escape sequence; The symbol \"{nxt}\" is not a valid escape sequence selector.")
        if body.startswith(("$${", "%%{"), i):
            out.append(body[i + 1:i + 3])
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _decode_heredoc(match: re.Match[str]) -> str:
    lines = (match.group(3) + "\n").splitlines(keepends=True)
    if match.group(1):  # <<-: strip the smallest indentation of the non-blank lines
        indent = min((len(ln) - len(ln.lstrip(" \t")) for ln in lines if ln.strip()), default=0)
        lines = [ln[indent:] for ln in lines]
    return re.sub(r"\$\$\{|%%\{", lambda m: m.group(0)[1:], "".join(lines))


def _value(raw: Any) -> Any:
    """An attribute value from python-hcl2's source-preserving form."""
    if isinstance(raw, list):
        return [_value(v) for v in raw]
    if isinstance(raw, dict):
        return {_key(k): _value(v) for k, v in raw.items() if k != "__is_block__"}
    if not isinstance(raw, str):
        return raw
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        heredoc = _HEREDOC.match(raw[1:-1]) if raw.startswith('"<<') and "\n" in raw else None
        return _decode_heredoc(heredoc) if heredoc else decode_quoted(raw)
    raise _bad(f"Unsupported expression; fake nomad cannot evaluate {raw!r} (variables, locals, functions)")


def _key(raw: str) -> str:
    return decode_quoted(raw) if raw.startswith('"') else raw


def _blocks(raw: Any) -> list[dict[str, Any]]:
    return raw if isinstance(raw, list) else [raw]


def _labeled(raw: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    labels = [k for k in raw if k != "__is_block__"]
    if len(labels) != 1 or not isinstance(raw[labels[0]], dict):
        raise _bad(f'Missing name for {kind}; All {kind} blocks must have 1 labels (name).')
    return _key(labels[0]), raw[labels[0]]


def _convert(kind: str, body: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {_LABELS[kind]: label} if kind in _LABELS else {}
    attrs, blocks = _ATTRS.get(kind, {}), _BLOCKS.get(kind, {})
    for name, raw in body.items():
        if name == "__is_block__":
            continue
        if name in blocks:
            _child(out, kind, name, raw)
        elif name in attrs:
            field = attrs[name]
            value = _value(raw)
            if isinstance(field, tuple):
                field, value = field[0], _duration(name, value)
            out[field] = value
        else:
            raise _bad(f'Unsupported argument; An argument or block named "{name}" is not expected in {kind} '
                       "(or the fake does not implement it).")
    if kind == "constraint" and not out.get("Operand"):
        out["Operand"] = "="
    if kind == "job" and out.get("Name") is None:
        out["Name"] = out["ID"]
    return out


def _duration(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _bad(f'Unsuitable value for "{name}": {exc}') from None


def _child(out: dict[str, Any], kind: str, name: str, raw: Any) -> None:
    field, how = _BLOCKS[kind][name]
    for block in _blocks(raw):
        if not isinstance(block, dict):
            raise _bad(f'Unsupported argument; "{name}" must be a block here.')
        if how in ("map", "raw"):
            out[field] = {**(out.get(field) or {}), **_value(block)}
        elif how == "port":  # jobspec2: a `static` port is reserved, any other one dynamic
            label, body = _labeled(block, name)
            port = _convert(name, body, label)
            out.setdefault("ReservedPorts" if "Value" in port else "DynamicPorts", []).append(port)
        elif how == "labeled":
            label, body = _labeled(block, name)
            out.setdefault(field, {})[label] = _convert(name, body, label)
        elif name in _LABELS:
            label, body = _labeled(block, name)
            out.setdefault(field, []).append(_convert(name, body, label))
        elif how == "list":
            out.setdefault(field, []).append(_convert(name, block))
        else:  # "one" / "inherit": a later block of the same kind wins, as in HCL's last-wins merge
            out[field] = _convert(name, block)


def _inherit_vault(job: dict[str, Any]) -> None:
    """A job- or group-level vault block applies to every task without its own (jobspec2 normalisation)."""
    job_vault = job.pop("Vault", None)
    for group in job.get("TaskGroups") or []:
        vault = group.pop("Vault", None) or job_vault
        for task in group.get("Tasks") or []:
            if vault is not None and task.get("Vault") is None:
                task["Vault"] = copy.deepcopy(vault)


def parse_hcl(text: str, *, canonical: bool = False) -> dict[str, Any]:
    """JobHCL -> the bare api.Job that `/v1/jobs/parse` answers with; raises Refused(400)."""
    if not text:
        raise Refused(400, "Job spec is empty")
    try:
        doc = hcl2.loads(text, serialization_options=_HCL_OPTIONS)
    except LarkError as exc:
        where = f"{getattr(exc, 'line', '?')},{getattr(exc, 'column', '?')}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Refused(400, f"Failed to parse job: input.hcl:{where}: Invalid syntax; {first}") from None
    unknown = [k for k in doc if k != "job"]
    if unknown:
        raise _bad(f'Unsupported block type; Blocks of type "{unknown[0]}" are not expected here '
                   "(or the fake does not implement them).")
    jobs = doc.get("job") or []
    if len(jobs) != 1:
        raise _bad(f'Expected exactly one "job" block, found {len(jobs)}')
    label, body = _labeled(jobs[0], "job")
    job = _convert("job", body, label)
    _inherit_vault(job)
    decoded = decode_job(job)
    return canonicalize(decoded) if canonical else decoded
