"""Reuse the live-service fixture of the service tests."""

from tests.service.conftest import service  # noqa: F401
