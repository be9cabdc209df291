"""A real service for tests: the app on uvicorn in a background thread, on a free loopback port."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import uvicorn

from embedding_assets.service import ServiceSettings, create_app
from tests.conftest import free_tcp_port


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class ServiceThread:
    """``create_app`` over the given resources, served by uvicorn on 127.0.0.1; ``stop()`` shuts it down."""

    def __init__(self, resources: dict, settings: ServiceSettings | None = None):
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(model=resources["model"], cache=resources["cache"],
                              index_store=resources["index_store"], settings=settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"service-{self.port}", daemon=True)

    def start(self, ready_timeout: float = 180) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/ready").status == 200:
                    return self
            except OSError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("the service thread exited before it was ready")
            time.sleep(0.1)
        raise TimeoutError(f"the service on {self.url} was not ready within {ready_timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.service

    def request(self, method: str, path: str, body=None, *, headers: dict | None = None, raw: bytes | None = None,
                timeout: float = 60) -> Answer:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, dict(exc.headers), exc.read())

    def get(self, path: str, **kwargs) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body=None, **kwargs) -> Answer:
        return self.request("POST", path, body, **kwargs)

    def metric(self, series: str) -> float:
        """The value of one /metrics series, named exactly as exposed (labels included); 0 when absent."""
        for line in self.get("/metrics").body.decode().splitlines():
            if line.rsplit(" ", 1)[0] == series:
                return float(line.rsplit(" ", 1)[1])
        return 0.0
