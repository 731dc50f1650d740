# -*- test-case-name: tests.test_bridge_guillotina -*-
"""
The service token: how workers authenticate when they call back.

A URL task never carries credentials.  The workers add
``Authorization: Bearer <token>`` themselves to the requests they send
under a configured URL prefix (their ``dispatch.credentials``), and
:class:`ServiceTokenValidator` authenticates a request carrying
``app_settings["quebert"]["service_token"]`` as the service principal
``quebert-service``, whose only role is ``quebert.Worker`` (permission
``quebert.RunTask``).  Tokens are compared in constant time; with no
token configured the validator authenticates nobody.

The add-on puts the validator first in ``auth_token_validators`` when the
application is configured (``subscribers.py``), whatever the
application's own list says.
"""

from __future__ import annotations

import hmac
from typing import Any, Optional

from guillotina._settings import app_settings
from guillotina.auth.users import GuillotinaUser

from quebert.bridge.guillotina.permissions import WORKER_ROLE
from quebert.bridge.guillotina.settings import SERVICE_PRINCIPAL


def service_principal() -> GuillotinaUser:
    """The principal of the workers: role ``quebert.Worker`` everywhere, nothing else."""
    return GuillotinaUser(user_id=SERVICE_PRINCIPAL, roles={WORKER_ROLE: 1},
                          properties={"title": "quebert workers"})


class ServiceTokenValidator:
    """A Guillotina token validator for the service token (bearer tokens only)."""

    for_validators = ("bearer",)

    async def validate(self, token: Any) -> Optional[GuillotinaUser]:
        expected = (app_settings.get("quebert") or {}).get("service_token")
        if not isinstance(expected, str) or not expected:
            return None
        if not isinstance(token, dict) or token.get("type") != "bearer":
            return None
        given = token.get("token")
        if not isinstance(given, str):
            return None
        if hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            return service_principal()
        return None
