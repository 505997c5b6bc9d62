"""A resumable stream whose client went away holds its admission slot while it runs, and gives it back when
--stream-retention runs out: the generation is cancelled and the stream forgotten. The shard is paused
meanwhile, so the generation surely cannot end by itself first."""
from __future__ import annotations

import os
import signal

import httpx
import pytest

from servers import Server, children, wait_for
from sse_client import RawStream

BODY = {"inputs": "1, 2, 3,", "parameters": {"max_new_tokens": 50}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("retention"), stream_retention=1, max_concurrent_requests=1)
    yield srv
    srv.stop()


def test_retention_expiry_cancels_the_stream_and_frees_its_slot(srv):
    (shard,) = children(srv.proc.pid)
    s = RawStream(srv.url, "/generate_stream", BODY, {"X-Sluice-Resumable": "1"})
    stream_id = s.headers["x-sluice-stream-id"]
    os.kill(shard, signal.SIGSTOP)
    try:
        s.close()
        # Its client is gone, but the stream holds the one slot: the next request is turned away.
        refused = httpx.post(srv.url + "/generate", json=BODY, timeout=30)
        assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
        # (Polled on /metrics: a resume would be a reader, and the retention starts again when it leaves.)
        wait_for(lambda: srv.metrics()["sluice_streams_kept"] == 0)
        wait_for(lambda: srv.metrics()["sluice_requests_in_flight"] == 0)
        assert srv.metrics()["sluice_streams_expired_total"] == 1
        gone = httpx.get(srv.url + f"/v1/streams/{stream_id}")
        assert gone.status_code == 404 and gone.json()["error_type"] == "not_found"
    finally:
        os.kill(shard, signal.SIGCONT)
    wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200)
    assert httpx.post(srv.url + "/generate", json=BODY, timeout=120).status_code == 200
