"""Python client of the Job Forge service: `Client` (blocking) and `AsyncClient` (asyncio), typed with the same
pydantic models as the server, plus `discover_url` (``--url`` → ``JOB_SERVICE_URL`` → Consul → localhost) and
`discover_token` (``--token`` → ``JOBFORGE_TOKEN``)."""

from jobforge.client._async import AsyncClient
from jobforge.client._discovery import DEFAULT_URL, SERVICE_NAME, discover_token, discover_url
from jobforge.client._sync import Client

__all__ = ["AsyncClient", "Client", "DEFAULT_URL", "SERVICE_NAME", "discover_token", "discover_url"]
