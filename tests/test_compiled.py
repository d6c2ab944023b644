"""The optional C extensions (chanstore.compiled): each is built wherever a C compiler is, and
``CHANSTORE_PURE_PYTHON=1`` turns them all off.

An extension is optional so that an install without a compiler still works; the cost is
that a build which failed quietly would go unnoticed, each module falling back on its
Python form. These tests are what notices.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from chanstore.compiled import extension

ROOT = Path(__file__).resolve().parents[1]

#: Each extension, and what a machine that failed to build it would lose.
EXTENSIONS = {
    "_cache_hits": "every cache hit would run at Python's speed",
    "_stored_form": "every large PUT would be parsed and hashed on the event loop again",
    "_spare_files": "a large json write would take the GIL back after each system call",
    "_redis_commands": "every round to Redis would be encoded in Python",
    "_json_shape": "every value would be copied into its JSON shape before it is encoded",
}


def test_every_extension_setup_py_declares_is_checked_here() -> None:
    declared = re.findall(r'"chanstore\.(_\w+)"', (ROOT / "setup.py").read_text())
    assert sorted(declared) == sorted(EXTENSIONS)


@pytest.mark.parametrize("name", sorted(EXTENSIONS))
def test_each_extension_is_built_where_a_compiler_is(name: str) -> None:
    if os.environ.get("CHANSTORE_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("CHANSTORE_PURE_PYTHON asks for the Python forms")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not any(Path(folder, compiler).exists() for folder in os.get_exec_path()):
        pytest.skip(f"no C compiler ({compiler}) here: the Python forms serve")
    assert extension(name) is not None, (
        f"chanstore.{name} was not built although a C compiler is here, so "
        f"{EXTENSIONS[name]}: `pip install -e .` should build it (are the Python headers "
        f"installed?)"
    )


def test_the_environment_turns_every_extension_off() -> None:
    code = (
        "import json, sys; from chanstore.compiled import extension; "
        "print(json.dumps({name: extension(name) is None for name in sys.argv[1:]}))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, *EXTENSIONS],
        env={**os.environ, "CHANSTORE_PURE_PYTHON": "1"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(run.stdout) == dict.fromkeys(EXTENSIONS, True)
