"""Memory of abandoned resumable streams: N clients open a resumable stream, read its first event and hang up.

    python bench/streams_memory.py [--streams 1000] [--per-stream 4096] [--total 2097152] [--max-tokens 40] [--model-id M]

Starts its own `sluice serve` on 127.0.0.1 with those byte caps (a long --stream-retention, so the
streams are cut by the caps, not forgotten), abandons the streams, waits until every generation has
ended, and prints the router's resident memory before and after, the store's byte gauge at its peak,
and how many streams were cut. Each stream would need about max_tokens x 250 bytes without the caps.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ROOT, free_port, wait_healthy  # noqa: E402
from soak import rss_mb  # noqa: E402

from sluice.process import stop  # noqa: E402


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def abandon(port: int, body: bytes, gate: asyncio.Semaphore) -> None:
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nX-Sluice-Resumable: 1\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await reader.readuntil(b"\r\n\r\n")  # the stream started: its id is in the head
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--per-stream", type=int, default=4096)
    ap.add_argument("--total", type=int, default=2 << 20)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--model-id", default=None, help="default: the embedded model (the router's memory is the point)")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp())
    argv = [sys.executable, "-m", "sluice", "serve", "--hostname", "127.0.0.1", "--port", str(port),
            "--shard-uds-path", str(tmp / "shard.sock"), "--max-concurrent-requests", str(args.streams + 10),
            "--stream-retention", "3600", "--stream-buffer-bytes", str(args.per_stream),
            "--stream-buffer-total-bytes", str(args.total), *(["--model-id", args.model_id] if args.model_id else [])]
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_healthy(url, proc, f"see {tmp / 'server.log'}")
            before = rss_mb(proc.pid)
            body = json.dumps({"prompt": "1, 2, 3,", "max_tokens": args.max_tokens, "ignore_eos": True,
                               "temperature": 0, "stream": True}).encode()
            start = time.monotonic()

            async def run() -> None:
                gate = asyncio.Semaphore(50)
                await asyncio.gather(*(abandon(port, body, gate) for _ in range(args.streams)))

            asyncio.run(run())
            peak_bytes, peak_rss = 0.0, before
            while True:
                peak_bytes = max(peak_bytes, metric(url, "sluice_stream_buffer_bytes"))
                peak_rss = max(peak_rss, rss_mb(proc.pid))
                if metric(url, "sluice_requests_in_flight") == 0:
                    break
                time.sleep(0.5)
            after = rss_mb(proc.pid)
            print(f"{args.streams} abandoned streams, caps {args.per_stream} B per stream / {args.total} B total, "
                  f"{time.monotonic() - start:.0f} s")
            print(f"store bytes: peak {peak_bytes:.0f}, now {metric(url, 'sluice_stream_buffer_bytes'):.0f}; "
                  f"streams kept {metric(url, 'sluice_streams_kept'):.0f}, "
                  f"cut {metric(url, 'sluice_streams_cut_total'):.0f}")
            print(f"router RSS: {before:.1f} MB before, {peak_rss:.1f} MB peak, {after:.1f} MB after "
                  f"(+{after - before:.1f} MB, {(after - before) * 1024 / args.streams:.1f} KB per stream)")
        finally:
            stop(proc, 30)


if __name__ == "__main__":
    main()
