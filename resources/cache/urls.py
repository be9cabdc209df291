"""Redis URLs: masking the password for logs and checking a URL before it is used."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis

REDIS_SCHEMES = ("redis", "rediss", "unix")


def mask_redis_url(url: str | None) -> str | None:
    """The URL with its password (and a ``password=`` query value) replaced by ``***``.

    A lone user-info part (``redis://secret@host``) is masked too: people often put a
    password there by mistake. A URL that cannot be parsed is returned as a placeholder.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis_url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str | None) -> list[str]:
    """Every spelling of the URL's secrets, to scrub them from error texts."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    secrets = []
    if parts.password:
        secrets += [parts.password, unquote(parts.password)]
    elif parts.username and "@" in parts.netloc:
        secrets += [parts.username, unquote(parts.username)]
    secrets += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """``text`` with every spelling of the URL's secrets replaced by ``***``."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def redis_url_problems(url: str) -> list[str]:
    """Problems with a Redis URL (scheme, host, port, database, client options), password masked."""
    masked = mask_redis_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        return [f"redis_url {masked} cannot be parsed: {scrub(str(exc), url)}"]
    if parts.scheme not in REDIS_SCHEMES:
        return [
            f"redis_url {masked} has scheme {parts.scheme!r}; expected redis://, rediss:// (TLS) "
            "or unix://"
        ]
    if parts.scheme == "unix":
        return [] if parts.path else [f"redis_url {masked} names no socket path"]
    if not parts.hostname:
        return [f"redis_url {masked} names no host"]
    db = unquote(parts.path).strip("/")
    if db and not db.isdigit():
        return [f"redis_url {masked} has database {db!r}; expected a number such as /0"]
    del port
    try:
        redis.connection.parse_url(url)  # the client's own parser: query options such as ?ssl_cert_reqs=
    except ValueError as exc:
        return [f"redis_url {masked} is rejected by the Redis client: {scrub(str(exc), url)}"]
    return []
