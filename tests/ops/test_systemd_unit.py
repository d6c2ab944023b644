"""systemd/chanstore.service, checked by systemd's own tools and by running under its limits.

systemd is not PID 1 on CI machines, so the unit cannot be started here.
Instead: ``systemd-analyze verify`` and ``systemd-analyze security`` judge the
unit file, and the daemon is run under the unit's restrictions that a process
can impose on itself (no capabilities, no new privileges, no writable and
executable memory, the unit's umask) to show Python and its native modules
(uvloop, httptools, hiredis) work under them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from chanstore.server.settings import _OPTIONS, env_name

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "chanstore.service"
ENV_FILE = ROOT / "config" / "chanstore.env"
MAX_EXPOSURE = 1.2


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed")
        pytest.skip(f"{name} is not installed")
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit with its /opt/chanstore paths pointed at this machine's chanstore."""
    chanstore = shutil.which("chanstore")
    if chanstore is None:
        pytest.fail("the chanstore console script is not installed (pip install -e .)")
    text = UNIT.read_text().replace("/opt/chanstore/bin/chanstore", chanstore)
    unit = tmp_path / "chanstore.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_clean(installed_unit: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "chanstore.service" in line]  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_unit_exposure_is_at_most_1_2(installed_unit: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for chanstore\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_runs_the_daemon_the_way_the_design_says() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"][0].endswith("chanstore serve")
    assert settings["ExecReload"][0].endswith("chanstore reload")  # waits for the verdict
    assert settings["Restart"] == ["on-failure"]
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["DynamicUser"] == ["yes"]
    assert settings["StateDirectory"] == ["chanstore"]
    assert settings["ConfigurationDirectory"] == ["chanstore"]
    assert settings["EnvironmentFile"] == ["-/etc/chanstore/chanstore.env"]
    assert settings["ProtectSystem"] == ["strict"]
    # AF_UNIX stays allowed: journald and the notify socket need it.
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0].split()


def test_the_units_malloc_tunables_are_taken_by_glibc() -> None:
    """The unit's GLIBC_TUNABLES, as glibc's own loader reads them (``ld.so
    --list-tunables``): a misspelt name or a value out of range is ignored without a
    word, which would quietly bring back a page fault per page of every large value."""
    entries = unit_settings(UNIT.read_text())["Environment"]
    tunables = dict(entry.partition("=")[::2] for entry in entries)["GLIBC_TUNABLES"]
    wanted = dict(entry.split("=") for entry in tunables.split(":"))
    assert set(wanted) == {"glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold"}
    listed = subprocess.run([_glibc_loader(), "--list-tunables"], capture_output=True,
                            text=True, check=True, timeout=30,
                            env={**os.environ, "GLIBC_TUNABLES": tunables})  # fmt: skip
    taken = dict(re.findall(r"^(glibc\.malloc\.\w+): (0x[0-9a-f]+)", listed.stdout, re.M))
    assert {name: int(taken[name], 16) for name in wanted} == {
        name: int(value) for name, value in wanted.items()
    }


def _glibc_loader() -> str:
    """The dynamic loader this machine's programs run under (it lists glibc's tunables)."""
    loaders = sorted(Path("/lib64").glob("ld-linux-*.so.*")) + sorted(
        Path("/lib").glob("ld-linux-*.so.*")
    )
    if not loaders:
        pytest.fail("no glibc dynamic loader in /lib64 or /lib: the unit's tunables need glibc")
    return str(loaders[0])


def test_example_environment_file_names_only_real_settings() -> None:
    known = {env_name(flag) for flag in _OPTIONS}
    named = re.findall(r"^#?(CHANSTORE_[A-Z_]+)=", ENV_FILE.read_text(), re.MULTILINE)
    assert named, "the example environment file sets nothing"
    assert set(named) <= known, set(named) - known


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Applies the unit's MemoryDenyWriteExecute= to itself (PR_SET_MDWE, Linux 6.3+;
# inherited across exec), then becomes the daemon.
_MDWE_LAUNCHER = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit("PR_SET_MDWE unsupported: errno %d" % ctypes.get_errno())
    os.umask(0o077)
    os.execv(sys.executable, [sys.executable, "-m", "chanstore.cli", *sys.argv[1:]])
""")


def test_daemon_serves_under_the_units_restrictions(tmp_path: Path) -> None:
    setpriv = _tool("setpriv")
    port = _free_port()
    (tmp_path / "db.json").write_text(
        '[{"implementation": "json", "name": "stats", "settings": {"root_dir": "data"}}]'
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHANSTORE_")}
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("CHANSTORE_"):
            key, _, value = line.partition("=")
            env[key] = value
    env.update(CHANSTORE_LISTEN=f"127.0.0.1:{port}", CHANSTORE_DB_CONFIG=str(tmp_path / "db.json"))
    command = [setpriv, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
               sys.executable, "-c", _MDWE_LAUNCHER, "serve"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the daemon did not start within 30s"
            time.sleep(0.05)
        put = httpx.put(f"{url}/v1/channels/c1/stats/HP", json=42, timeout=10)
        assert put.status_code == 200, put.text
        assert httpx.get(f"{url}/v1/channels/c1/stats/HP", timeout=10).json() == 42
        stored = tmp_path / "data" / "service_chanstore" / "channel_c1" / "stats" / "HP.json"
        assert stored.stat().st_mode & 0o077 == 0  # the unit's UMask=0077
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert status == 0, process.stderr.read() if process.stderr else ""
