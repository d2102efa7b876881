"""A real Prefect server on loopback and `synthloop serve` against it: what the integration
tests of the deployments (tests/test_deployments.py) and of the authenticated run surface
(tests/test_served_surface.py) share."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import tool_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check, timeout: float, interval: float = 0.5):  # noqa: ANN001, ANN201
    """What `check` returns once it is truthy, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    return None


def wait_until(check, timeout: float, what: str, interval: float = 0.5):  # noqa: ANN001, ANN201
    found = poll(check, timeout, interval)
    if not found:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    return found


class PrefectServer:
    """`prefect server start` on a loopback port with its own home and database; with
    `auth_string` ("user:password") the server requires Prefect's basic authentication, and
    `env` (for clients, `synthloop serve`) carries the string."""

    def __init__(self, home: Path, auth_string: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.auth_string = auth_string
        self.env = {
            **tool_env(),
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        server_env = dict(self.env)
        if auth_string:
            self.env["PREFECT_API_AUTH_STRING"] = auth_string
            server_env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
        self.log = open(home / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=server_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prefect server exited:\n{(home / 'server.log').read_text()}")
            try:  # the health probe needs no credentials
                return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 180, "the Prefect server")

    def client(self, authenticated: bool = True):  # noqa: ANN201
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(api=self.api, auth_string=self.auth_string if authenticated else None)

    def call(self, coro_fn, authenticated: bool = True):  # noqa: ANN001, ANN201
        async def go():  # noqa: ANN202
            async with self.client(authenticated) as client:
                return await coro_fn(client)

        # In a thread of its own: the caller may be inside an event loop (Playwright's).
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@contextlib.contextmanager
def serving(server: PrefectServer, ws: Path) -> Iterator[subprocess.Popen]:
    """`synthloop serve` in `ws` with the server's client environment, until both
    deployments are registered; stopped on exit."""
    log = open(ws.parent / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        ["synthloop", "serve"],
        cwd=ws,
        env={**server.env, "OMP_NUM_THREADS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    async def both(client):  # noqa: ANN001, ANN202
        found = await client.read_deployments()
        return {d.name for d in found} >= {"nightly", "manual"}

    def registered() -> bool:
        if proc.poll() is not None:
            output = (ws.parent / "serve.log").read_text()
            raise AssertionError(f"synthloop serve exited:\n{output}")
        return server.call(both)

    try:
        wait_until(registered, 120, "synthloop serve to register")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_run(server: PrefectServer, run_id, timeout: float = 420):  # noqa: ANN001, ANN201
    async def read(client):  # noqa: ANN001, ANN202
        return await client.read_flow_run(run_id)

    return wait_until(
        lambda: (r := server.call(read)).state.is_final() and r, timeout, f"flow run {run_id}", 2
    )
