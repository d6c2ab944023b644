"""Fixtures of the daemon's end-to-end tests: real ``chanstore serve`` processes.

* ``start_daemon`` starts daemons for one test (any config, flags, environment);
* ``daemon`` is one daemon shared by a test module (json containers ``stats`` and
  ``profiles``, ``--max-body-bytes 4096``), for tests that only read and write
  their own channel (``channel`` gives each test a fresh channel id);
* ``redis`` is a redis-server that the test itself starts and may stop;
  ``module_redis`` one a test module shares.

They are defined in daemon_fixtures.py, which tests/http shares.
"""

from __future__ import annotations

from daemon_fixtures import (
    channel,
    daemon,
    module_daemon_fixture,
    module_redis,
    redis,
    start_daemon,
)
from daemon_harness import MODULE_MAX_BODY

__all__ = ["channel", "daemon", "module_daemon", "module_redis", "redis", "start_daemon"]

module_daemon = module_daemon_fixture("daemon", MODULE_MAX_BODY)
