"""Progress: a bar on a terminal, plain lines into a pipe (never terminal escapes there)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

from transfer_fixtures import SERVICE, fill

from chanstore.transfer.progress import Progress

ESCAPES = ("\r", "\x1b")


def test_plain_lines_say_how_far_and_how_fast():
    out = io.StringIO()
    with Progress("migrate", 3, out, interval=0) as progress:
        for _ in range(3):
            progress.advance(10)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("migrate: 1/3 channel containers, 10 keys (")
    assert lines[-1].startswith("migrate: 3/3 channel containers, 30 keys (")
    assert not any(escape in out.getvalue() for escape in ESCAPES)


def test_lines_come_at_most_every_interval():
    out = io.StringIO()
    with Progress("export", 1000, out, interval=3600) as progress:
        for _ in range(1000):
            progress.advance(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # the last one only


def test_the_command_draws_a_bar_on_a_terminal(configs, tmp_path):
    old, new = configs.json(root="old"), configs.json(root="new")
    fill(old, {f"c{n}": {"stats": {"k": n}} for n in range(30)})
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "chanstore.cli", "migrate", "--from", str(old),
               "--to", str(new)]  # fmt: skip
    env = {**os.environ, "CHANSTORE_SERVICE_ID": SERVICE, "COLUMNS": "100"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=secondary, env=env,
                               cwd=tmp_path)  # fmt: skip
    os.close(secondary)
    drawn = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the terminal closed: the command ended
                    break
                if not chunk:
                    break
                drawn += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0, drawn.decode(errors="replace")
    finally:
        process.kill()
        os.close(primary)
    text = drawn.decode(errors="replace")
    assert "\r" in text, text
    assert "migrate: 100%" in text and "30/30" in text, text


def test_the_command_writes_plain_lines_into_a_pipe(configs, cli):
    old, new = configs.json(root="old"), configs.json(root="new")
    fill(old, {f"c{n}": {"stats": {"k": n}} for n in range(30)})
    ran = cli("migrate", "--from", str(old), "--to", str(new))
    assert ran.status == 0, ran.stderr
    assert not any(escape in ran.stderr + ran.stdout for escape in ESCAPES), ran.stderr
    assert ran.stderr.splitlines()[-1].startswith("migrate: 30/30 channel containers, 30 keys")
