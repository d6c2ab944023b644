"""Fixtures of the transfer tests (defined in transfer_fixtures.py, which the tests import)."""

from __future__ import annotations

from transfer_fixtures import cli, configs

__all__ = ["cli", "configs"]
