"""The Nomad backend: parameterized dispatch, the event stream, framed logs (see `backend.py`)."""

from jobforge.backends.nomad.api import NomadAPI
from jobforge.backends.nomad.backend import NomadBackend
from jobforge.backends.nomad.http import NomadError, NomadHTTP

__all__ = ["NomadAPI", "NomadBackend", "NomadError", "NomadHTTP"]
