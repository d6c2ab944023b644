"""Moving data: export to lines, import them, and migrate between backends.

::

    chanstore export --db-config config/db.json > backup.jsonl
    chanstore import --db-config config/db.json backup.jsonl
    chanstore migrate --from config/db.json --to config/redis.json --verify

Modules, one idea each:

- :mod:`~chanstore.transfer.places`: which channels' containers a transfer
  moves, listed by the backends themselves (never ``KEYS``);
- :mod:`~chanstore.transfer.records`: the export format, a JSON object a line;
- :mod:`~chanstore.transfer.copying`: the one write path, which writes only
  what the target lacks, so that a rerun copies nothing twice;
- :mod:`~chanstore.transfer.operations`: :func:`export`, :func:`import_lines`
  and :func:`migrate`;
- :mod:`~chanstore.transfer.tally` and :mod:`~chanstore.transfer.progress`:
  the per-container report, and progress while the work runs.
"""

from __future__ import annotations

from chanstore.transfer.operations import export, import_lines, migrate
from chanstore.transfer.tally import Tally, render

__all__ = ["Tally", "export", "import_lines", "migrate", "render"]
