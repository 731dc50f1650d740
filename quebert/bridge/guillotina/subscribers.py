# -*- test-case-name: tests.test_bridge_guillotina_live -*-
"""
The add-on's life: start with the application, stop with it.

Guillotina awaits these subscribers on its own asyncio loop, so the
bridge's connections belong to that loop (an async utility's
``initialize`` would not be awaited).
"""

from __future__ import annotations

from guillotina import configure
from guillotina._settings import app_settings
from guillotina.interfaces import (
    IApplicationCleanupEvent,
    IApplicationConfiguredEvent,
    IApplicationInitializedEvent,
)

from quebert.bridge.guillotina import bridge
from quebert.bridge.guillotina.auth import ServiceTokenValidator
from quebert.bridge.guillotina.settings import BridgeSettings


@configure.subscriber(for_=IApplicationConfiguredEvent)
def configured(event) -> None:
    """
    Check ``app_settings["quebert"]`` (a bad value stops the application
    here, with the key named) and put the service-token validator first
    in ``auth_token_validators``.
    """
    BridgeSettings.from_mapping(app_settings.get("quebert"))
    validators = [v for v in app_settings.get("auth_token_validators") or []
                  if v is not ServiceTokenValidator]
    app_settings["auth_token_validators"] = [ServiceTokenValidator, *validators]


@configure.subscriber(for_=IApplicationInitializedEvent)
async def initialized(event) -> None:
    """Connect the bridge (RabbitMQ, Redis) on Guillotina's loop."""
    await bridge.start(app_settings.get("quebert"))


@configure.subscriber(for_=IApplicationCleanupEvent)
async def cleanup(event) -> None:
    """Close the bridge's connections."""
    await bridge.stop()
