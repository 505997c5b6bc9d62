"""Tensor parallelism's cost on this machine: N=1 vs N ranks, in one run, through the full HTTP path.

    python bench/bench_tp.py [--num-shard 3] [--tokens 64] [--streams 4]

Prints decode tokens/s (1 stream and several), the weight bytes each rank holds (loaded slice by
slice exactly as the shard does), and each rank's resident memory while serving. On a 2-core CPU,
TP cannot be faster: the figures show what the per-layer all-reduces cost.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_serving import run_streams, sluice_server  # noqa: E402


def weight_bytes(num_shard: int, dtype: str) -> list[int]:
    import torch

    from shard.models.loader import load_model
    from shard.parallel import TPGroup
    from sluice.modelfiles import resolve

    out = []
    for rank in range(num_shard):
        model = load_model(resolve(None), getattr(torch, dtype), TPGroup(rank, num_shard))
        out.append(sum(p.numel() * p.element_size() for p in model.parameters()))
        del model
    return out


def rss_mb(marker: str) -> list[float]:
    """Resident memory of every shard rank process whose command line holds `marker`."""
    sizes = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmd and " shard " in cmd:
                rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS"))
                sizes.append(int(rss.split()[1]) / 1024)
        except (OSError, StopIteration):
            continue
    return sorted(sizes)


def measure(num_shard: int, args) -> dict:
    flags = ["--dtype", args.dtype, "--num-shard", str(num_shard), "--max-batch-total-tokens", "8192"]
    with sluice_server(*flags) as (url, sock):
        run_streams(url, 1, 8)
        one = run_streams(url, 1, args.tokens)
        many = run_streams(url, args.streams, args.tokens)
        return {"one": one, "many": many, "rss": rss_mb(sock)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-shard", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    base, tp = measure(1, args), measure(args.num_shard, args)
    w1, wn = weight_bytes(1, args.dtype), weight_bytes(args.num_shard, args.dtype)
    n = args.num_shard
    print(f"\nSmolLM2 {args.dtype}, {args.tokens} new tokens; N=1 vs N={n} on this machine")
    print(f"{'':36s}{'N=1':>12s}{f'N={n}':>12s}{'ratio':>9s}")
    rows = [
        ("1 stream decode, tok/s", base["one"]["per_stream_decode_tok_s"], tp["one"]["per_stream_decode_tok_s"]),
        ("1 stream ITL p50, ms", base["one"]["itl_ms_p50"], tp["one"]["itl_ms_p50"]),
        (f"{args.streams} streams aggregate, tok/s", base["many"]["aggregate_tok_s"], tp["many"]["aggregate_tok_s"]),
        ("weights, MiB (all ranks)", sum(w1) / 2**20, sum(wn) / 2**20),
        ("resident memory, MiB (all ranks)", sum(base["rss"]), sum(tp["rss"])),
    ]
    for name, a, b in rows:
        print(f"{name:36s}{a:12.1f}{b:12.1f}{b / a:8.2f}x")
    print(f"weights per rank, MiB: {[round(x / 2**20, 1) for x in wn]}")
    print(f"resident memory per rank, MiB: N=1 {[round(x) for x in base['rss']]}, N={n} {[round(x) for x in tp['rss']]}")


if __name__ == "__main__":
    main()
