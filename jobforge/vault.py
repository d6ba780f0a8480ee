"""The service's own Vault client (hvac, KV v2): the local backend's source of a job's Vault credentials.

On Nomad the phase jobs read Vault through their templates; with the local backend nothing renders those, so the
service reads the same paths itself, at dispatch time, and hands the values to the task scripts in the same
environment variables the Nomad templates write (`JOBFORGE_JOB_GIT_*`, `JOBFORGE_JOB_REGISTRY_*`,
`JOBFORGE_SECRET_<NAME>`). Which phase gets which secret is `jobforge.nomad.variants.variant_spec`, the rule the
Nomad jobs follow, so both backends hand a phase exactly the same secrets.

hvac is blocking: every call runs in a worker thread, one at a time (a lock), so a login or renewal is never raced.
Login: VAULT_TOKEN, VAULT_TOKEN_FILE (re-read at each login) or AppRole. A renewable token is renewed once less
than a third of its TTL is left (checked before each read, so no background task); a token that cannot be renewed
any more is replaced by a new login where one is possible (token file, AppRole).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import hvac
import requests
from hvac import exceptions as hvac_errors
from pydantic import BaseModel, ConfigDict, ValidationError

from jobforge.config import JobConfig
from jobforge.errors import SecretReadError
from jobforge.nomad.render import GIT_FIELDS, REGISTRY_FIELDS, SECRET_ENV_PREFIX
from jobforge.nomad.variants import variant_spec
from jobforge.settings import VaultSettings

log = logging.getLogger("jobforge.vault")

_RENEW_FRACTION = 1 / 3  # renew when less than this much of the TTL is left


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KvV2Data(_Wire):
    """`data` of a KV v2 read: the secret's fields (None for a deleted version) and its metadata."""

    data: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class KvV2Read(_Wire):
    """GET /v1/<mount>/data/<path>."""

    data: KvV2Data


class AuthInfo(_Wire):
    """`auth` of a login or renew-self answer."""

    client_token: str
    lease_duration: int = 0
    renewable: bool = False


class LoginReply(_Wire):
    auth: AuthInfo


class TokenLookupData(_Wire):
    ttl: int = 0
    renewable: bool = False


class TokenLookup(_Wire):
    """GET /v1/auth/token/lookup-self."""

    data: TokenLookupData


def _value(raw: Any) -> str:
    """A field as the Nomad template writes it (`toJSON`, parsed back by the env-file reader): strings as they
    are, anything else as JSON."""
    return raw if isinstance(raw, str) else json.dumps(raw)


class VaultReader:
    """Reads a job's KV v2 secrets for one phase. `clock` is monotonic seconds (tests may move it)."""

    def __init__(self, settings: VaultSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._client = hvac.Client(url=settings.addr, timeout=settings.timeout)
        self._lock = threading.Lock()
        self._logged_in = False
        self._expires: float | None = None  # monotonic; None: no known expiry
        self._ttl = 0.0
        self._renewable = False

    async def phase_env(self, phase: str, config: JobConfig) -> dict[str, str]:
        """The environment variables carrying `phase`'s Vault values of `config` (empty when it names none)."""
        spec = variant_spec(phase, config)
        wanted: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        if spec.git_credentials_path:
            wanted.append((spec.git_credentials_path, GIT_FIELDS))
        if spec.registry_credentials_path:
            wanted.append((spec.registry_credentials_path, REGISTRY_FIELDS))
        for secret in spec.vault_secrets:
            wanted.append((secret.path, tuple((f, SECRET_ENV_PREFIX + env) for f, env in secret.fields)))
        if not wanted:
            return {}
        return await asyncio.to_thread(self._read_all, wanted)

    def _read_all(self, wanted) -> dict[str, str]:
        env: dict[str, str] = {}
        with self._lock:
            for path, fields in wanted:
                data = self._read(path)
                for field, name in fields:
                    if data.get(field) not in (None, ""):  # missing: left unset; the scripts name the variable
                        env[name] = _value(data[field])
        return env

    # ------------------------------------------------------------ blocking, under the lock

    def _read(self, path: str) -> dict[str, Any]:
        try:
            self._ensure_token()
            raw = self._client.read(path)
        except hvac_errors.Forbidden:
            raise SecretReadError(f"Vault refused to read {path}: permission denied") from None
        except hvac_errors.VaultDown:
            raise SecretReadError(f"Vault is sealed or down; could not read {path}") from None
        except hvac_errors.VaultError as exc:
            raise SecretReadError(f"Vault could not read {path}: {exc.__class__.__name__}") from None
        except requests.RequestException as exc:
            raise SecretReadError(f"Vault at {self._settings.addr} unreachable reading {path}: "
                                  f"{exc.__class__.__name__}") from None
        except ValidationError:
            raise SecretReadError(f"Vault's login answer was not understood; could not read {path}") from None
        if raw is None:
            raise SecretReadError(f"no Vault secret at {path} (KV v2 paths read like 'secret/data/<name>')")
        try:
            data = KvV2Read.model_validate(raw).data.data
        except ValidationError:
            raise SecretReadError(f"Vault's answer for {path} is not a KV v2 secret") from None
        if data is None:
            raise SecretReadError(f"the Vault secret at {path} is deleted")
        return data

    def _ensure_token(self) -> None:
        if not self._logged_in:
            self._login()
            return
        if self._expires is None or self._expires - self._clock() > self._ttl * _RENEW_FRACTION:
            return
        if self._renewable:
            try:
                auth = LoginReply.model_validate(self._client.auth.token.renew_self()).auth
                self._remember(auth.lease_duration, auth.renewable)
                log.info("renewed the Vault token (ttl %ds)", auth.lease_duration)
                return
            except (hvac_errors.VaultError, requests.RequestException, ValidationError) as exc:
                log.warning("could not renew the Vault token (%s); logging in again", exc.__class__.__name__)
        self._login()

    def _login(self) -> None:
        s = self._settings
        if s.role_id and s.secret_id:
            reply = LoginReply.model_validate(self._client.auth.approle.login(
                role_id=s.role_id, secret_id=s.secret_id.get_secret_value(), mount_point=s.approle_mount,
                use_token=True))
            self._remember(reply.auth.lease_duration, reply.auth.renewable)
            log.info("logged in to Vault with AppRole (ttl %ds)", reply.auth.lease_duration)
        else:
            if s.token_file is not None:
                try:
                    token = s.token_file.read_text().strip()
                except OSError as exc:
                    raise SecretReadError(f"VAULT_TOKEN_FILE {s.token_file} unreadable: {exc.strerror}") from None
            else:
                token = s.token.get_secret_value() if s.token else ""
            self._client.token = token
            self._lookup()
        self._logged_in = True

    def _lookup(self) -> None:
        """A given token's TTL, when Vault tells (a root token or a double may not: then it never expires)."""
        try:
            data = TokenLookup.model_validate(self._client.auth.token.lookup_self()).data
        except (hvac_errors.VaultError, requests.RequestException, ValidationError):
            self._remember(0, False)
            return
        self._remember(data.ttl, data.renewable)

    def _remember(self, ttl: int, renewable: bool) -> None:
        self._ttl, self._renewable = float(ttl), renewable
        self._expires = self._clock() + ttl if ttl > 0 else None


async def no_vault(phase: str, config: JobConfig) -> dict[str, str]:
    """The source without a Vault login: a phase that needs a Vault value fails naming the setting."""
    spec = variant_spec(phase, config)
    paths = [p for p in (spec.git_credentials_path, spec.registry_credentials_path) if p]
    paths += [s.path for s in spec.vault_secrets]
    if paths:
        raise SecretReadError(f"the job names Vault path {paths[0]}, but the service has no Vault login "
                              "(set VAULT_ADDR with VAULT_TOKEN, VAULT_TOKEN_FILE or VAULT_ROLE_ID/VAULT_SECRET_ID)")
    return {}
