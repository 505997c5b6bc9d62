"""Who a request belongs to, and that tenant's limits: the API key's tenant (`--api-keys-file`), the one
`--api-key`'s ("default"), the `X-Tenant` header when no key is required, else "anonymous".

The keys file has one key per line: `KEY TENANT [max_concurrent=N] [tokens_per_minute=N] [weight=W]`
(`#` starts a comment). Several keys may share a tenant; its limits may be written on any of its lines.
It is read at start-up and again on SIGHUP (a file that does not parse keeps the table in use).
The tenant travels to the shard (fair scheduling) and labels the per-tenant metrics; Admission applies
the limits.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field

from .metrics import Metrics

log = logging.getLogger("sluice.router")

TENANT_HEADER = b"x-tenant"
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
WINDOW_S = 60.0  # tokens_per_minute counts the tokens served over this sliding window
OTHER = "other"  # the metrics label of tenants nobody configured (header values are unbounded)


@dataclass(frozen=True)
class Tenant:
    name: str
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    weight: float = 1.0


ANONYMOUS = Tenant("anonymous")
DEFAULT = "default"  # the tenant of the single --api-key


class TokenWindow:
    """Tokens served over the last WINDOW_S seconds, in one-second buckets."""

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, tokens], oldest first

    def add(self, tokens: int, now: float) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])

    def used(self, now: float) -> int:
        while self.buckets and self.buckets[0][0] <= now - WINDOW_S:
            self.buckets.popleft()
        return sum(n for _, n in self.buckets)

    def retry_after(self, limit: int, now: float) -> int:
        """Whole seconds until the window holds fewer than `limit` tokens, as its oldest buckets leave it."""
        used = self.used(now)
        if used < limit:
            return 0
        for second, n in self.buckets:
            used -= n
            if used < limit:
                return max(1, math.ceil(second + WINDOW_S - now))
        return math.ceil(WINDOW_S)  # not reached: an empty window is under any positive limit


@dataclass
class Usage:
    """One tenant's live state in this router."""

    tenant: Tenant
    label: str  # for metrics: the name when configured, else OTHER
    in_flight: int = 0
    window: TokenWindow = field(default_factory=TokenWindow)
    metrics: Metrics | None = None
    counters: dict = field(default_factory=dict)  # kind -> its tenant_tokens child: labels() per token costs more

    def served(self, tokens: int, kind: str) -> None:
        self.window.add(tokens, time.monotonic())
        if self.metrics is not None:
            counter = self.counters.get(kind)
            if counter is None:
                counter = self.counters[kind] = self.metrics.tenant_tokens.labels(self.label, kind)
            counter.inc(tokens)


# The request's tenant, set by Admission for everything the request runs (the handler, its stream,
# the shard call), as REQUEST_ID is. Tokens are counted to it by generation.PieceMaker, which takes it
# along: a pushed stream's replies come in the shard stream reader's context.
CURRENT: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("tenant", default=None)


def current() -> Tenant:
    usage = CURRENT.get()
    return usage.tenant if usage else ANONYMOUS


def parse_keys(text: str) -> dict[bytes, Tenant]:
    """{sha256(key): tenant} from a keys file's text; ValueError names the line that is wrong."""
    limits: dict[str, dict] = {}
    owners: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2 or not _NAME.fullmatch(words[1]):
            raise ValueError(f"line {number}: expected `KEY TENANT [name=value ...]`, tenant of A-Za-z0-9._:-")
        key, name = words[0], words[1]
        tenant = limits.setdefault(name, {})
        for word in words[2:]:
            option, _, value = word.partition("=")
            try:
                parsed = {"max_concurrent": int, "tokens_per_minute": int, "weight": float}[option](value)
            except (KeyError, ValueError):
                raise ValueError(f"line {number}: {word!r}: expected max_concurrent=N, tokens_per_minute=N "
                                 "or weight=W") from None
            if parsed <= 0 or not math.isfinite(parsed):
                raise ValueError(f"line {number}: {option} must be positive")
            if tenant.get(option, parsed) != parsed:
                raise ValueError(f"line {number}: tenant {name} has another {option} on an earlier line")
            tenant[option] = parsed
        digest = _digest(key)
        if owners.get(digest, name) != name:
            raise ValueError(f"line {number}: this key already belongs to tenant {owners[digest]}")
        owners[digest] = name
    return {digest: Tenant(name, **limits[name]) for digest, name in owners.items()}


def _digest(key: str | bytes) -> bytes:
    # Keys are looked up by their hash: a dict lookup on the hash reveals nothing usable about the key.
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class Tenants:
    """The key table and each tenant's usage."""

    def __init__(self, api_key: str | None, keys_file: str | None, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        self.keys_file = keys_file
        self.usage: dict[str, Usage] = {}
        self._set_keys(self._read() if keys_file else {})  # at start-up a bad file is fatal

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key or self.keys_file)

    def reload(self) -> None:
        """SIGHUP: read the keys file again; a file that does not parse changes nothing."""
        if not self.keys_file:
            return
        try:
            self._set_keys(self._read())
        except (OSError, ValueError) as exc:
            log.error("keys file %s not reloaded: %s", self.keys_file, exc)
            return
        log.info("keys file %s reloaded: %d key(s)", self.keys_file, len(self.keys))

    def _read(self) -> dict[bytes, Tenant]:
        with open(self.keys_file, encoding="utf-8") as f:
            return parse_keys(f.read())

    def _set_keys(self, keys: dict[bytes, Tenant]) -> None:
        self.keys = keys
        # The bounded set of tenant labels in /metrics, besides OTHER.
        self.labels = {*(t.name for t in keys.values()), ANONYMOUS.name, DEFAULT}

    def identify(self, headers: dict[bytes, bytes]) -> Tenant | str:
        """The request's tenant, or why it has none (a 401's message when a key is required, a 422's otherwise)."""
        auth = headers.get(b"authorization", b"")
        if self.auth_required:
            if self.api_key and hmac.compare_digest(auth, self.api_key):
                return Tenant(DEFAULT)
            scheme, _, key = auth.partition(b" ")
            tenant = self.keys.get(_digest(key)) if scheme.lower() == b"bearer" and key else None
            return tenant or "missing or wrong API key"
        name = headers.get(TENANT_HEADER, b"").decode("latin-1")
        if not name:
            return ANONYMOUS
        if not _NAME.fullmatch(name):
            return "X-Tenant: 1 to 64 characters of A-Za-z0-9._:-"
        return Tenant(name)

    def usage_of(self, tenant: Tenant) -> Usage:
        """The tenant's live state (its limits as last read: a reload applies to tenants already known)."""
        usage = self.usage.get(tenant.name)
        if usage is None:
            if len(self.usage) > len(self.labels) + 1024:  # header tenants come and go: forget idle ones
                now = time.monotonic()
                self.usage = {n: u for n, u in self.usage.items() if u.in_flight or u.window.used(now)}
            usage = self.usage[tenant.name] = Usage(tenant, OTHER, metrics=self.metrics)
        usage.tenant = tenant
        usage.label = tenant.name if tenant.name in self.labels else OTHER
        return usage

    @staticmethod
    def refusal(usage: Usage, now: float) -> tuple[str, int] | None:
        """(message, Retry-After seconds) when the tenant is over one of its limits, else None."""
        t = usage.tenant
        if t.max_concurrent is not None and usage.in_flight >= t.max_concurrent:
            return f"tenant {t.name} has {usage.in_flight} requests in flight, its limit is {t.max_concurrent}", 1
        if t.tokens_per_minute is not None:
            used = usage.window.used(now)
            if used >= t.tokens_per_minute:
                return (f"tenant {t.name} was served {used} tokens in the last minute, its limit is "
                        f"{t.tokens_per_minute} per minute"), usage.window.retry_after(t.tokens_per_minute, now)
        return None
