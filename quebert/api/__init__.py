"""
quebert's HTTP task API: push, inspect and cancel tasks from any HTTP client.

- :func:`make_site` builds a ``twisted.web`` site serving the API of an
  :class:`ITaskService` with an :class:`ApiConfig` (tokens, body limit);
- :class:`ApiResource` is the same API as a resource to mount elsewhere;
- :class:`MemoryTaskService` is an in-memory backend for tests;
- :func:`openapi_document` is the OpenAPI 3.1 document (also served at
  ``/openapi.json``).

See ``docs/http-api.rst``.
"""

from quebert.api.config import ApiConfig
from quebert.api.interfaces import ITaskService
from quebert.api.memory import MemoryTaskService
from quebert.api.openapi import document as openapi_document
from quebert.api.resource import ROUTES, ApiResource, Route, make_site

__all__ = [
    "ROUTES",
    "ApiConfig",
    "ApiResource",
    "ITaskService",
    "MemoryTaskService",
    "Route",
    "make_site",
    "openapi_document",
]
