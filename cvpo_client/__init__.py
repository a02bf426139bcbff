"""A typed Python client of the CVPO service's REST API: jobs, metrics, policies, ``/act`` with NumPy
arrays, evaluations, aliases, and problem+json errors as exceptions (README, "Python client").

It imports only the standard library and NumPy (``tests/repo/test_layout.py`` checks it), so a
controller can use it without torch or any of the service's packages.
"""

from __future__ import annotations

from cvpo_client._version import __version__
from cvpo_client.client import Client
from cvpo_client.errors import (
    AuthError,
    Busy,
    Conflict,
    CvpoAPIError,
    CvpoConnectionError,
    CvpoError,
    InvalidRequest,
    NotFound,
    WaitTimeout,
)
from cvpo_client.models import ActResult, Alias, AliasEvent, Checkpoint, Evaluation, Job, Policy

__all__ = [
    "ActResult",
    "Alias",
    "AliasEvent",
    "AuthError",
    "Busy",
    "Checkpoint",
    "Client",
    "Conflict",
    "CvpoAPIError",
    "CvpoConnectionError",
    "CvpoError",
    "Evaluation",
    "InvalidRequest",
    "Job",
    "NotFound",
    "Policy",
    "WaitTimeout",
    "__version__",
]
