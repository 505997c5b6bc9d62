"""`--shard-address` expansion: only `dns:///NAME:PORT` becomes every address NAME resolves to."""
import asyncio

from router.pool import resolve


def test_resolve_expands_dns_names_only():
    assert asyncio.run(resolve("127.0.0.1:5")) == ["127.0.0.1:5"]
    assert asyncio.run(resolve("unix:///tmp/s.sock")) == ["unix:///tmp/s.sock"]
    assert "ipv4:127.0.0.1:50051" in asyncio.run(resolve("dns:///localhost:50051"))
