"""Redis over TLS (rediss://) with AUTH, configured by URL alone, against a real TLS redis-server."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.core.identity import embedding_cache_key
from resources.cache import EmbeddingCacheResource
from tests.conftest import REDIS_SERVER_BINARY, free_tcp_port

PASSWORD = "tls-s3cret-pass"


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server with only a TLS port, a self-signed certificate for 127.0.0.1 and a password."""
    if not Path(REDIS_SERVER_BINARY).exists() or not shutil.which("openssl"):
        pytest.skip("redis-server or openssl missing; run `make test`, which installs redis-server")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_tcp_port()
    server = subprocess.Popen(
        [REDIS_SERVER_BINARY, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1"):
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.skip("this redis-server build does not serve TLS")
            time.sleep(0.1)
    try:
        yield port, cert
    finally:
        server.kill()
        server.wait(timeout=10)


def test_rediss_url_with_password_and_ca_works_and_never_logs_the_password(tmp_path, tls_redis, caplog):
    port, cert = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    key = embedding_cache_key("model-tls", "a" * 64)
    vector = np.linspace(-1, 1, 8, dtype=np.float32)
    with caplog.at_level(logging.DEBUG):
        writer = EmbeddingCacheResource(home=str(tmp_path / "one"), redis_url=url, disk_enabled=False)
        writer.set_many([(key, vector)])
        # Another home (empty LRU and disk): the only way to get the vector is Redis over TLS.
        reader = EmbeddingCacheResource(home=str(tmp_path / "two"), redis_url=url, disk_enabled=False, lru_entries=1)
        got = reader.get_many([key], 8)
    assert got[0] is not None and np.array_equal(got[0], vector)
    assert reader.stats()["redis_hits"] == 1 and reader.stats()["redis_status"] == "ok"
    assert PASSWORD not in caplog.text


def test_plain_redis_url_against_a_tls_port_degrades_without_raising(tmp_path, tls_redis, caplog):
    port, _ = tls_redis
    cache = EmbeddingCacheResource(
        home=str(tmp_path), redis_url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0", redis_timeout_ms=200
    )
    key = embedding_cache_key("model-tls", "b" * 64)
    with caplog.at_level(logging.WARNING):
        cache.set_many([(key, np.ones(4, dtype=np.float32))])
        assert cache.get_many([key], 4)[0] is not None  # served by the local tiers
    assert cache.stats()["redis_status"] == "degraded"
    assert PASSWORD not in caplog.text
