"""--token-file: /v1 and /-/reload need the bearer token; the probes stay open; no leaks."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from daemon_harness import JSON_CONTAINERS, DaemonProcess, key_path, run_cli

from chanstore.client import UnauthorizedError

TOKEN = "tok-Zq8vW3e9RkP1xY7m"
WRONG_TOKENS = [TOKEN + "x", TOKEN[:-1], TOKEN.lower(), "x" * len(TOKEN), ""]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    # Debug logging: the chattiest the daemon gets, so the no-leak check means most.
    daemon = DaemonProcess(tmp_path_factory.mktemp("auth"), JSON_CONTAINERS, token=TOKEN,
                           log_level="debug")  # fmt: skip
    daemon.start()
    yield daemon
    problems = daemon.close()
    assert not problems, problems
    assert TOKEN not in daemon.log_text()


@pytest.fixture(scope="module")
def anonymous(secured: DaemonProcess) -> Iterator[httpx.Client]:
    """An HTTP client that sends no token of its own."""
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/channels/c1/stats/HP"),
        ("PUT", "/v1/channels/c1/stats/HP"),
        ("DELETE", "/v1/channels/c1/stats/HP"),
        ("GET", "/v1/channels/c1/stats"),
        ("POST", "/v1/channels/c1/stats/-/set"),
        ("GET", "/v1/containers"),
        ("GET", "/v1/no/such/route"),
        ("POST", "/-/reload"),
    ],
)
def test_data_and_control_routes_need_the_token(
    secured: DaemonProcess, anonymous: httpx.Client, method: str, path: str
) -> None:
    before = secured.data_files()
    body = b'{"values": {"HP": 1}}'
    missing = anonymous.request(method, path, content=body)
    assert missing.status_code == 401
    assert missing.json()["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")

    wrong_headers = [f"Bearer {wrong}".strip() for wrong in WRONG_TOKENS]
    wrong_headers += [f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}", f"Bearer {TOKEN} {TOKEN}"]
    for header in wrong_headers:
        response = anonymous.request(method, path, headers={"authorization": header}, content=body)
        # The same answer whatever was wrong: nothing to learn from it.
        assert response.status_code == 401
        assert response.content == missing.content
        assert TOKEN not in response.text
    assert secured.data_files() == before


def test_the_right_token_is_served(
    secured: DaemonProcess, anonymous: httpx.Client, channel: str
) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    url = key_path(channel, "stats", "HP")
    assert anonymous.put(url, json=5, headers=headers).status_code == 200
    assert anonymous.get(url, headers=headers).json() == 5
    # The scheme is case-insensitive, as RFC 7235 has it.
    assert anonymous.get(url, headers={"authorization": f"bearer {TOKEN}"}).json() == 5
    reload = anonymous.post("/-/reload", headers=headers)
    assert reload.status_code == 200
    assert reload.json()["ok"] is True


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_and_metrics_stay_open(anonymous: httpx.Client, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 200
    assert TOKEN not in response.text


def test_clients_use_the_token(secured: DaemonProcess, channel: str) -> None:
    with secured.client() as client:
        client.channel(channel).stats["HP"] = 9
        assert client.channel(channel).stats["HP"] == 9
    with secured.client(token="wrong") as client, pytest.raises(UnauthorizedError) as caught:
        client.get(channel, "stats", "HP")
    assert caught.value.status == 401
    assert TOKEN not in str(caught.value)

    token_flags = ["--listen", secured.listen, "--token-file", str(secured.token_file)]
    shown = run_cli("get", channel, "stats", "HP", *token_flags)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "9"
    refused = run_cli("get", channel, "stats", "HP", "--listen", secured.listen)
    assert refused.returncode != 0
    assert "token" in refused.stderr
    reloaded = run_cli("reload", *token_flags)
    assert reloaded.returncode == 0, reloaded.stderr
    not_reloaded = run_cli("reload", "--listen", secured.listen)
    assert not_reloaded.returncode != 0
    assert "token" in not_reloaded.stderr
    # The token file may also be given as CHANSTORE_TOKEN_FILE, as a systemd unit would.
    via_env = run_cli("keys", channel, "stats", "--listen", secured.listen,
                      env={"CHANSTORE_TOKEN_FILE": str(secured.token_file)})  # fmt: skip
    assert via_env.returncode == 0, via_env.stderr
    assert via_env.stdout.split() == ["HP"]


def test_the_token_never_appears_in_the_log(
    secured: DaemonProcess, anonymous: httpx.Client, channel: str
) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "x-request-id": "auth-check"}
    assert anonymous.put(key_path(channel, "stats", "k"), json=1, headers=headers).is_success
    anonymous.get("/v1/nope", headers={"authorization": f"Bearer {TOKEN}x"})
    assert anonymous.post("/-/reload", headers=headers).is_success

    log = secured.log_text()
    assert "auth-check" in log  # the requests were logged (at debug)...
    assert TOKEN not in log  # ...without the token
    assert TOKEN[:-1] not in log


def test_a_rotated_token_is_read_on_reload(start_daemon, tmp_path) -> None:
    """An operator writes a new token file and reloads: the old token stops working."""
    daemon: DaemonProcess = start_daemon(JSON_CONTAINERS, token="first-token")
    old = {"Authorization": "Bearer first-token"}
    assert daemon.http.get("/v1/containers", headers=old).status_code == 200

    assert daemon.token_file is not None
    daemon.token_file.write_text("second-token\n")
    verdict = daemon.http.post("/-/reload", headers=old)
    assert verdict.status_code == 200, verdict.text

    assert daemon.http.get("/v1/containers", headers=old).status_code == 401
    new = {"Authorization": "Bearer second-token"}
    assert daemon.http.get("/v1/containers", headers=new).status_code == 200


def test_an_empty_token_file_rejects_the_reload_and_the_old_token_stays(start_daemon) -> None:
    daemon: DaemonProcess = start_daemon(JSON_CONTAINERS, token="first-token")
    old = {"Authorization": "Bearer first-token"}
    assert daemon.token_file is not None
    daemon.token_file.write_text("\n")

    verdict = daemon.http.post("/-/reload", headers=old)
    assert verdict.status_code == 400
    assert any("is empty" in problem for problem in verdict.json()["problems"])
    assert daemon.http.get("/v1/containers", headers=old).status_code == 200
