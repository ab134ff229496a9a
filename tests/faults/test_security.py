"""Letting no one in: tokens, their scope and their throttle, size limits, TLS, quiet logs.

Real hosts and pools; a real certificate authority made with ``openssl`` for TLS. The
throttle's sliding window is also checked on its own with an injected clock.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cloudgpu.remote_host.throttle import BadTokenThrottle
from servers import HostFactory, HostProcess, PoolProcess, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cloudgpu import _http, _wire
from cloudgpu.errors import AuthenticationError, HostConnectionError, TooManyAttemptsError
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(120)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def running(pool: PoolProcess, hardware: str = "cpu", **kw: object) -> dict[str, object]:
    """A new session of this machine's user, once running (long-polled, as clients do)."""
    view = pool.request("POST", "/api/sessions", json={"hardware": hardware}, **kw).json()
    while view["state"] in ("queued", "starting"):
        view = pool.request("GET", f"/api/sessions/{view['id']}",
                            params={"wait": 20, "version": view["version"]}, **kw).json()
    assert view["state"] == "running", view
    return view


# --- the throttle --------------------------------------------------------------------------


def test_the_throttle_counts_wrong_tokens_in_a_sliding_window() -> None:
    now = [1000.0]
    throttle = BadTokenThrottle(allowed=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.refusal("10.0.0.1") is None
        throttle.failed("10.0.0.1")
    assert "try again in 60 s" in (throttle.refusal("10.0.0.1") or "")
    assert throttle.refusal("10.0.0.2") is None  # per address
    now[0] += 30
    assert throttle.retry_after("10.0.0.1") == pytest.approx(30)
    now[0] += 30.5
    assert throttle.refusal("10.0.0.1") is None  # the window moved on


def test_a_host_answers_429_after_repeated_wrong_tokens_but_still_opens_to_the_right_one(
        host_factory: HostFactory) -> None:
    strict = host_factory.start(None, name="strict",
                                args=["--HostIdentityProvider.bad_tokens_allowed=3"])
    statuses = [strict.get_as("wrong-" + secrets.token_hex(4), "/api/kernels").status_code
                for _ in range(5)]
    assert statuses == [403, 403, 403, 429, 429], statuses
    refused = strict.get_as("still-wrong", "/api/cloudgpu/host")
    assert "Too many wrong tokens" in refused.json()["message"]
    assert strict.get("/api/cloudgpu/host").status_code == 200

    async def ask() -> None:
        async with HostClient(strict.url, "wrong") as client:
            await client.info()

    with pytest.raises(TooManyAttemptsError, match="Too many wrong tokens"):
        asyncio.run(ask())
    strict.stop()


def test_a_pool_answers_429_after_repeated_wrong_tokens(tmp_path: Path,
                                                        host: HostProcess) -> None:
    config = tmp_path / "strict.py"
    config.write_text("c.PoolApp.bad_tokens_allowed = 2\nc.PoolApp.warm_kernels = {}\n")
    pool = PoolProcess(tmp_path, [host], config, name="strict").start()
    try:
        statuses = [pool.request("GET", "/api/hardware", token="nope").status_code
                    for _ in range(3)]
        assert statuses == [403, 403, 429], statuses
        assert pool.request("GET", "/api/hardware").status_code == 200
        body = pool.request("GET", "/api/pool", token="nope").json()
        assert body["error"] == "TooManyAttemptsError"
    finally:
        pool.stop()


# --- scopes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, host: HostProcess) -> Iterator[PoolProcess]:
    tmp = tmp_path_factory.mktemp("security")
    config = tmp / "pool_config.py"
    config.write_text(f"c.PoolApp.users = {{{secrets.token_hex(16)!r}: 'bob'}}\n"
                      "c.PoolApp.warm_kernels = {}\nc.PoolApp.bad_tokens_allowed = 1000\n")
    started = PoolProcess(tmp, [host], config).start()
    yield started
    started.stop()


def test_a_session_token_opens_its_kernel_and_nothing_else_anywhere(
        pool: PoolProcess, host: HostProcess) -> None:
    mine, other = running(pool), running(pool)
    token = str(mine["token"])
    try:
        # Not a pool token: it cannot list sessions, start one or see the hardware.
        for method, path in [("GET", "/api/sessions"), ("POST", "/api/sessions"),
                             ("GET", "/api/hardware"), ("GET", f"/api/sessions/{mine['id']}")]:
            assert pool.request(method, path, token=token).status_code == 403, path
        # On the host: its own kernel yes, the other session's kernel no, nothing else.
        assert host.get_as(token, f"/api/kernels/{mine['kernel_id']}").status_code == 200
        for path in (f"/api/kernels/{other['kernel_id']}", "/api/kernels",
                     "/api/cloudgpu/host", f"/api/kernels/{mine['kernel_id']}/../../kernels",
                     f"/api/kernels/{mine['kernel_id']}/channels/../../{other['kernel_id']}"):
            assert host.get_as(token, path).status_code in (403, 404), path

        async def open_other() -> None:
            grant = Grant(host.url, token, other["kernel_id"], "cpu")
            await RemoteSession.open(grant)

        with pytest.raises(AuthenticationError):
            asyncio.run(open_other())
    finally:
        for s in (mine, other):
            pool.request("DELETE", f"/api/sessions/{s['id']}")
    # Once its session ended, the token says so, and opens nothing.
    ended = host.get_as(token, f"/api/kernels/{mine['kernel_id']}")
    assert ended.status_code == 403 and "has ended" in ended.json()["message"]


def test_every_host_endpoint_needs_the_token(host_factory: HostFactory) -> None:
    fresh = host_factory.start(None, name="endpoints",
                               args=["--HostIdentityProvider.bad_tokens_allowed=1000"])
    for method, path in [("GET", "/"), ("GET", "/api"), ("GET", "/api/status"),
                         ("GET", "/api/me"), ("GET", "/api/kernels"), ("POST", "/api/kernels"),
                         ("GET", "/api/kernelspecs"), ("GET", "/api/cloudgpu/host"),
                         ("POST", "/api/cloudgpu/kernels"), ("GET", "/api/cloudgpu/kernels/x"),
                         ("POST", "/api/shutdown"), ("GET", "/static/style/index.css"),
                         ("GET", "/api/sessions"), ("GET", "/api/contents"),
                         ("GET", "/api/terminals"), ("GET", "/metrics")]:
        response = httpx.request(method, fresh.url + path, timeout=30)
        assert response.status_code == 403, (method, path, response.status_code)
    assert fresh.proc.poll() is None
    fresh.stop()


# --- size limits --------------------------------------------------------------------------


def test_a_pool_refuses_a_body_over_its_limit_with_a_clear_error(pool: PoolProcess) -> None:
    big = {"hardware": "cpu", "notebook": "x" * (3 << 19)}  # 1.5 MiB
    response = pool.request("POST", "/api/sessions", json=big)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["error"] == "RequestTooLargeError"
    assert "at most 1,048,576" in body["message"]
    assert pool.request("GET", "/api/hardware").status_code == 200


def test_a_host_closes_a_websocket_message_over_its_limit_and_serves_on(
        host: HostProcess) -> None:
    async def go() -> tuple[int | None, str]:
        async with HostClient(host.url, host.token) as admin:
            kernel = await admin.start_kernel("cpu")
            url = host.url.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels"
            async with connect(url, additional_headers=auth(host.token),
                               subprotocols=[_wire.SUBPROTOCOL],  # type: ignore[list-item]
                               max_size=None) as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.send(b"\0" * (11 << 20))
                    await ws.recv()
                code = ws.close_code
            # The kernel and the host are fine: a real session runs a cell.
            session = await RemoteSession.open(Grant(host.url, host.token, kernel["id"], "cpu"))
            out: list[str] = []
            await session.run_cell("print('fine')", {}, [],
                                   lambda k, m: out.append(m["content"].get("text", "")))
            await session.close(shutdown=True)
            return code, "".join(out)

    code, out = asyncio.run(go())
    assert code == 1009  # message too big (RFC 6455)
    assert out == "fine\n"


# --- TLS ----------------------------------------------------------------------------------


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=cloudgpu test CA", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "host.key", "-out", "host.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "host.pem")
    return folder / "ca.pem", folder / "host.pem", folder / "host.key"


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a test set CLOUDGPU_CA_FILE for this process's client; forget it afterwards."""
    _http.tls_context.cache_clear()
    yield
    monkeypatch.delenv("CLOUDGPU_CA_FILE", raising=False)
    _http.tls_context.cache_clear()


def test_tls_hosts_and_pools_with_certificates_checked(
        host_factory: HostFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        trust: None) -> None:
    ca, cert, key = make_certificates(tmp_path)
    secure = host_factory.start("H100:1", name="tls", args=[f"--certfile={cert}",
                                                             f"--keyfile={key}"])
    assert secure.url.startswith("https://127.0.0.1:")

    async def cell(url: str, token: str, kernel_id: str) -> str:
        session = await RemoteSession.open(Grant(url, token, kernel_id, "H100"))
        out: list[str] = []
        await session.run_cell("print('over wss')", {}, [],
                               lambda k, m: out.append(m["content"].get("text", "")))
        await session.close()
        return "".join(out)

    async def start_kernel() -> str:
        async with HostClient(secure.url, secure.token) as admin:
            return str((await admin.start_kernel("H100"))["id"])

    # Certificates are checked by default: an unknown CA is refused, saying why.
    with pytest.raises(HostConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(start_kernel())
    monkeypatch.setenv("CLOUDGPU_CA_FILE", str(ca))
    _http.tls_context.cache_clear()
    kernel_id = asyncio.run(start_kernel())
    assert asyncio.run(cell(secure.url, secure.token, kernel_id)) == "over wss\n"

    # A pool with TLS, over the TLS host: clients and the pool itself check certificates.
    config = tmp_path / "tls_pool.py"
    config.write_text("c.PoolApp.warm_kernels = {}\n")
    pool = PoolProcess(tmp_path, [secure], config, name="tlspool",
                       args=[f"--certfile={cert}", f"--keyfile={key}"]).start()
    try:
        assert pool.url.startswith("https://127.0.0.1:")
        view = running(pool, "H100", verify=_http.tls_context())
        assert str(view["host_url"]).startswith("https://"), view
        assert asyncio.run(cell(str(view["host_url"]), str(view["token"]),
                                str(view["kernel_id"]))) == "over wss\n"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{pool.url}/api/pool", headers=auth(pool.token), timeout=10)
    finally:
        pool.stop()
        secure.stop()


# --- tokens stay secret -----------------------------------------------------------------


def test_tokens_are_never_logged_or_shown(pool: PoolProcess, host: HostProcess) -> None:
    session = running(pool)
    # A token in the URL (allowed, for tools that cannot send headers) is not logged either.
    assert httpx.get(f"{pool.url}/api/pool?token={pool.token}", timeout=30).status_code == 200
    assert httpx.get(f"{host.url}/api/cloudgpu/host?token={host.token}",
                     timeout=30).status_code == 200
    pool.request("DELETE", f"/api/sessions/{session['id']}")
    wait_until(lambda: "DELETE /api/sessions" in pool.log.read_text(), within=10,
               what="the pool logging the request")
    secrets_seen = [pool.token, host.token, str(session["token"])]
    for log in (pool.log, host.log):
        text = log.read_text(errors="replace")
        assert text, log
        for secret in secrets_seen:
            assert secret not in text, f"a token is in {log.name}"
    # Error messages name hosts by URL, never with their token.
    async def unreachable() -> str:
        try:
            async with HostClient("http://127.0.0.1:9", host.token) as client:
                await client.info()
        except HostConnectionError as e:
            return str(e)
        return ""

    message = asyncio.run(unreachable())
    assert "127.0.0.1:9" in message and host.token not in message
    listed = json.dumps(pool.request("GET", "/api/sessions").json())
    assert str(session["token"]) not in listed  # listings never carry session tokens


def test_the_side_channel_behind_tls_is_relayed_by_the_host_and_moves_values_exactly(
        host_factory: HostFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        trust: None) -> None:
    from test_side import SIDE_MIN, round_trip

    ca, cert, key = make_certificates(tmp_path)
    secure = host_factory.start(name="tls-side", args=[f"--certfile={cert}",
                                                       f"--keyfile={key}"])
    monkeypatch.setenv("CLOUDGPU_CA_FILE", str(ca))
    _http.tls_context.cache_clear()

    async def go() -> None:
        async with HostClient(secure.url, secure.token) as admin:
            kernel_id = str((await admin.start_kernel("cpu"))["id"])
            session = await RemoteSession.open(Grant(secure.url, secure.token, kernel_id, "cpu"))
            try:
                watched, _ = await round_trip(session)
                assert await session.kernel.side_channel() is not None, session.kernel.side_off
                assert max(watched.sent) < SIDE_MIN and max(watched.received) < SIDE_MIN
            finally:
                await session.close()
                await admin.shutdown(kernel_id)

    try:
        asyncio.run(go())
    finally:
        secure.stop()
