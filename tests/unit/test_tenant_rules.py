"""Tenants: the keys file, who a request belongs to, and the tokens-per-minute window's Retry-After."""
from __future__ import annotations

import pytest

from router.tenants import ANONYMOUS, OTHER, Tenant, Tenants, TokenWindow, parse_keys

KEYS = """
# key        tenant  limits
k-alice-1    alice   max_concurrent=2 weight=2
k-alice-2    alice
k-bob        bob     tokens_per_minute=1000   # a comment
"""


def bearer(key: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {key}".encode()}


def test_keys_file_maps_each_key_to_its_tenant_and_limits(tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    tenants = Tenants(None, str(path))
    alice = Tenant("alice", max_concurrent=2, weight=2.0)
    assert tenants.identify(bearer("k-alice-1")) == alice == tenants.identify(bearer("k-alice-2"))
    assert tenants.identify(bearer("k-bob")) == Tenant("bob", tokens_per_minute=1000)
    assert isinstance(tenants.identify(bearer("k-eve")), str)
    assert isinstance(tenants.identify({}), str)
    assert isinstance(tenants.identify({b"x-tenant": b"alice"}), str), "the header is no key"


@pytest.mark.parametrize("text", [
    "onlykey\n",
    "k t max_concurrent=x\n",
    "k t colour=blue\n",
    "k t weight=0\n",
    "k t weight=nan\n",
    "k1 t max_concurrent=1\nk2 t max_concurrent=2\n",  # one tenant, two limits
    "k t1\nk t2\n",  # one key, two tenants
    "k bad/name\n",
])
def test_a_wrong_keys_file_names_its_line(text):
    with pytest.raises(ValueError, match="line"):
        parse_keys(text)


def test_reload_reads_new_keys_and_keeps_the_old_table_on_a_bad_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("k1 alice\n")
    tenants = Tenants(None, str(path))
    path.write_text("k2 bob max_concurrent=1\n")
    tenants.reload()
    assert tenants.identify(bearer("k2")) == Tenant("bob", max_concurrent=1)
    assert isinstance(tenants.identify(bearer("k1")), str)
    path.write_text("k3\n")
    tenants.reload()
    assert tenants.identify(bearer("k2")).name == "bob"


def test_without_keys_the_header_names_the_tenant():
    tenants = Tenants(None, None)
    assert tenants.identify({}) is ANONYMOUS
    assert tenants.identify({b"x-tenant": b"team-a"}) == Tenant("team-a")
    assert isinstance(tenants.identify({b"x-tenant": b"no spaces"}), str)
    # Header tenants are not configured ones: their metrics share one label.
    assert tenants.usage_of(Tenant("team-a")).label == OTHER
    assert tenants.usage_of(ANONYMOUS).label == "anonymous"


def test_the_single_api_key_is_the_default_tenant():
    tenants = Tenants("secret", None)
    assert tenants.identify(bearer("secret")).name == "default"
    assert isinstance(tenants.identify(bearer("secreT")), str)


def test_limits_refuse_with_a_reason():
    tenants = Tenants(None, None)
    usage = tenants.usage_of(Tenant("t", max_concurrent=1, tokens_per_minute=100))
    assert tenants.refusal(usage, 1000.0) is None
    usage.in_flight = 1
    message, retry = tenants.refusal(usage, 1000.0)
    assert "1 requests in flight" in message and retry == 1
    usage.in_flight = 0
    usage.window.add(100, 1000.0)
    message, retry = tenants.refusal(usage, 1010.0)
    assert "100 tokens in the last minute" in message and retry == 50


def test_retry_after_waits_for_just_enough_tokens_to_leave_the_window():
    window = TokenWindow()
    window.add(60, 100.2)  # second 100
    window.add(30, 130.0)
    window.add(30, 150.5)
    assert window.used(155.0) == 120
    assert window.retry_after(200, 155.0) == 0  # under the limit already
    assert window.retry_after(100, 155.0) == 5  # once second 100's 60 leave (at 160), 60 < 100
    assert window.retry_after(60, 155.0) == 35  # second 130's 30 must leave too (at 190)
    assert window.used(160.0) == 60  # second 100 is out of the window
