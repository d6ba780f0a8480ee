"""Where the service is: ``--url``, else ``JOB_SERVICE_URL``, else Consul's catalog, else localhost.

The answer carries its source, so "cannot reach …" errors say which of the four was used and users know what to
fix. The Consul lookup is one catalog call (``/v1/catalog/service/jobforge-service``) through python-consul2.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import consul
import requests

from jobforge.errors import ServiceUnavailable

__all__ = ["DEFAULT_URL", "SERVICE_NAME", "consul_service_url", "discover_token", "discover_url", "endpoint"]

DEFAULT_URL = "http://localhost:8080"
SERVICE_NAME = "jobforge-service"


def _normalise(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _consul_client(consul_addr: str, token: str | None, timeout: float) -> consul.Consul:
    """A python-consul2 client for CONSUL_HTTP_ADDR (`host:port` or a URL)."""
    parts = urlsplit(_normalise(consul_addr))
    with warnings.catch_warnings():  # it warns about legacy-ACL and discovery-chain APIs we never call
        warnings.simplefilter("ignore", DeprecationWarning)
        default_port = 443 if parts.scheme == "https" else 8500
        client = consul.Consul(host=parts.hostname or "127.0.0.1", port=parts.port or default_port,
                               scheme=parts.scheme, token=token, timeout=timeout)
    client.token = token  # python-consul2 prefers $CONSUL_HTTP_TOKEN over the argument; ours is explicit
    return client


def consul_service_url(consul_addr: str, *, token: str | None = None, session: requests.Session | None = None,
                       timeout: float = 5.0) -> str:
    """The first catalog entry of `SERVICE_NAME`: ``ServiceAddress`` (may be empty → node ``Address``) and port.

    One plain request/response call, so python-consul2's blocking client fits here (the CLI is synchronous).
    """
    where = f"Consul at {_normalise(consul_addr)} (CONSUL_HTTP_ADDR)"
    client = _consul_client(consul_addr, token, timeout)
    if session is not None:
        client.http.session = session
    try:
        _index, entries = client.catalog.service(SERVICE_NAME)
    except requests.RequestException as exc:
        raise ServiceUnavailable(f"cannot reach {where} to look up {SERVICE_NAME}: {exc}") from exc
    except consul.ConsulException as exc:
        raise ServiceUnavailable(f"{where} refused the look-up of {SERVICE_NAME}: "
                                 f"{exc.__class__.__name__} {str(exc)[:200]}") from None
    except ValueError as exc:
        raise ServiceUnavailable(f"unexpected catalog answer from {where}: {exc!r}") from None
    try:
        entry: dict[str, Any] = entries[0]
        address = entry.get("ServiceAddress") or entry["Address"]
        port = int(entry["ServicePort"])
    except IndexError:
        raise ServiceUnavailable(f"service {SERVICE_NAME} is not registered in {where}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServiceUnavailable(f"unexpected catalog answer from {where}: {exc!r}") from None
    return f"http://{_host(address)}:{port}"


def discover_url(explicit: str | None = None, *, env: Mapping[str, str] | None = None,
                 session: requests.Session | None = None) -> tuple[str, str]:
    """Return ``(url, source)``; `source` names where the URL came from, for error messages."""
    env = os.environ if env is None else env
    if explicit:
        return _normalise(explicit), "--url"
    if env.get("JOB_SERVICE_URL"):
        return _normalise(env["JOB_SERVICE_URL"]), "JOB_SERVICE_URL"
    if env.get("CONSUL_HTTP_ADDR"):
        addr = env["CONSUL_HTTP_ADDR"]
        url = consul_service_url(addr, token=env.get("CONSUL_HTTP_TOKEN"), session=session)
        return url, f"Consul catalog at {_normalise(addr)}"
    return DEFAULT_URL, "default"


def endpoint(url: str | None, source: str | None) -> tuple[str, str]:
    """The service URL (discovered when not given) and where it came from, for error messages."""
    if url is None:
        return discover_url()
    return url.rstrip("/"), source or "explicit URL"


def discover_token(explicit: str | None = None, *, env: Mapping[str, str] | None = None) -> str | None:
    """The API token: the one given (``--token``), else ``JOBFORGE_TOKEN``, else none (a loopback service
    without tokens needs none)."""
    env = os.environ if env is None else env
    return explicit or env.get("JOBFORGE_TOKEN") or None
