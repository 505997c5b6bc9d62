"""Sluice vs llama.cpp's `llama-server` on the same GGUF, on this CPU, with one load generator.

    python bench/bench_llamacpp.py [--concurrency 1 16 64] [--requests N] [--prompt-tokens 128]
        [--output-tokens 128] [--long-prompt-tokens 1500] [--prefix-tokens 1000]  (0: skip that scenario)
        [--formats Q4_1 Q8_0 BF16] [--sluice-flags "--dtype float32" --sluice-flags "--dtype bfloat16"]
        [--llama-server PATH] [--llama-quantize PATH] [--skip-llamacpp] [--skip-sluice] [--rounds N] [--json OUT]

NEVER run it while anything else runs on the machine: every number is wall-clock on shared cores.

Setup (first run only, cached under ~/.cache/sluice-bench/, or $SLUICE_BENCH_CACHE):
  * llama.cpp: `llama-server` and `llama-quantize` are taken from --llama-server/--llama-quantize
    ($LLAMA_SERVER/$LLAMA_QUANTIZE), else from the cache, else built from the llama.cpp tree vendored
    in the `llama-cpp-python` sdist (pip download, cmake Release, GGML_NATIVE, one job, nice 19).
  * GGUFs: the shipped Q4_1 SmolLM2 (sluice.modelfiles.resolve) is requantized with
    `llama-quantize --allow-requantize` to Q8_0 and BF16. (These carry Q4_1's rounding: the formats
    differ in speed, not in the weights' information.)

What it measures, per server (llama.cpp in each format, Sluice in each --sluice-flags configuration),
the way vLLM's benchmark_serving reports it: request throughput (req/s), output tokens/s, TTFT
p50/p95, ITL p50/p95, in these scenarios:
  * c=N: N concurrent streams of --prompt-tokens unique prompts, --output-tokens each, for each --concurrency;
  * long: --long-prompt-tokens prompts at concurrency 4;
  * prefix: sequential pairs sharing a --prefix-tokens prefix: the second request's TTFT vs the first's.
All requests are streaming POST /v1/completions, temperature 0, ignore_eos, so each should produce
exactly --output-tokens; the "out/req" column shows what actually came back (a short count means the
server stopped early, e.g. ignoring ignore_eos). Prompts are varied text, unique per request (a
distinct random word sequence each), so no prefix cache helps except in the prefix scenario.

With --rounds N (N > 1) every server is up at once and they take turns, round after round, on fresh
prompts each round; each figure is the median over the rounds (one stream's ITL moved by up to 20% between
runs minutes apart on a shared host, on both sides).

The table has one block per scenario, a row per server, and a ratio row: Sluice (each configuration)
divided by llama.cpp's best format for that metric (highest for throughputs, lowest for latencies,
named in the cell), so >1 is better for throughput and <1 is better for latency.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice.health import wait_until_healthy  # noqa: E402
from sluice.process import stop  # noqa: E402

CACHE = Path(os.environ.get("SLUICE_BENCH_CACHE", Path.home() / ".cache" / "sluice-bench"))
CORES = os.cpu_count() or 1
LLAMA_FORMATS = ("Q4_1", "Q8_0", "BF16")

# Words for the prompts: common English words, most of them one SmolLM2 token with their leading space,
# so N words come out at roughly N tokens (the server's own prompt count is shown in the table).
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but have one their also new first two after they been who its more other time into all would "
    "city river house water light stone garden market winter summer music paper letter train road bridge "
    "forest mountain island village castle window table kitchen doctor teacher farmer captain engine "
    "machine silver golden quiet bright ancient modern simple strong gentle heavy narrow distant early "
    "late small large green blue red black white old young long short warm cold dark clear open north "
    "south east west morning evening night storm cloud rain snow wind fire sea ship harbor lamp book "
    "story song history science number question answer reason school church street field tree flower "
    "bird horse dog cat fish bread salt wine honey apple corn wheat iron copper glass wood cloth thread "
    "walked opened found built wrote carried watched followed crossed turned remembered learned "
    "quickly slowly often never always again together almost perhaps suddenly finally"
).split()


# --- host ------------------------------------------------------------------------------------------

def cpu_capability() -> dict:
    """torch's CPU capability and the AVX-512 / AMX flags that decide which kernels either server can use."""
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception as exc:  # torch is Sluice's dependency, but the table should not depend on it
        capability = f"unknown ({exc})"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    return {"cpu": model, "cores": CORES, "torch_cpu_capability": capability,
            "flags": {f: f in flags for f in wanted}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- llama.cpp: find or build, quantize ------------------------------------------------------------

def run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    print(f"  $ {shlex.join(cmd)}  (log: {log})", flush=True)
    with log.open("a") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if rc:
        raise SystemExit(f"failed ({rc}): {shlex.join(cmd)}; see {log}")


def build_llamacpp() -> Path:
    """Build llama-server + llama-quantize from the llama-cpp-python sdist's vendored llama.cpp; the bin dir."""
    build, src = CACHE / "build", CACHE / "src"
    bin_dir = build / "bin"
    if (bin_dir / "llama-server").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise SystemExit(f"building llama.cpp needs {tool} (apt-get install cmake g++), or pass --llama-server")
    src.mkdir(parents=True, exist_ok=True)
    log = CACHE / "build.log"
    print(f"building llama.cpp into {build} (one job, nice 19; takes a while)", flush=True)
    t0 = time.perf_counter()
    sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python", "-d", str(src)], log)
        sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    tree = src / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not tree.exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(src, filter="data")
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    # LLAMA_CURL is deprecated in this tree (downloads go through its own HTTP code): switch off OpenSSL
    # and the prebuilt web UI instead, so the build needs no network and no libssl headers.
    run_logged(nice + ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                       "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                       "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                       "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
                       "-DLLAMA_USE_PREBUILT_UI=OFF"], log)
    run_logged(nice + ["cmake", "--build", str(build), "--target", "llama-server", "llama-quantize", "-j1"], log)
    print(f"built llama.cpp in {time.perf_counter() - t0:.0f} s", flush=True)
    return bin_dir


def llamacpp_tools(server: str | None, quantize: str | None) -> tuple[Path, Path]:
    server = server or os.environ.get("LLAMA_SERVER")
    quantize = quantize or os.environ.get("LLAMA_QUANTIZE")
    if server and not quantize:
        sibling = Path(server).with_name("llama-quantize")
        quantize = str(sibling) if sibling.exists() else shutil.which("llama-quantize")
    if not (server and quantize):
        bin_dir = build_llamacpp()
        server, quantize = server or str(bin_dir / "llama-server"), quantize or str(bin_dir / "llama-quantize")
    return Path(server), Path(quantize)


def gguf_formats(source: Path, quantize: Path, formats: list[str]) -> dict[str, Path]:
    """The shipped GGUF (its own format) plus requantized copies, cached by source name."""
    shipped = next((f for f in LLAMA_FORMATS if f in source.name.upper()), "Q4_1")
    out: dict[str, Path] = {}
    for fmt in formats:
        if fmt == shipped:
            out[fmt] = source
            continue
        target = CACHE / "gguf" / f"{source.stem}.{fmt}.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            run_logged([str(quantize), "--allow-requantize", str(source), str(tmp), fmt, str(CORES)],
                       CACHE / "quantize.log")
            tmp.rename(target)
        out[fmt] = target
    return out


# --- servers ---------------------------------------------------------------------------------------

@contextmanager
def serving(name: str, cmd: list[str], port: int, log: Path, wait_for_log: str = "") -> Iterator[str]:
    """Start `cmd`, wait for GET /health = 200 (and for `wait_for_log` to appear in its log), yield the
    base URL; stop it afterwards."""
    url = f"http://127.0.0.1:{port}"
    print(f"[{name}] {shlex.join(cmd)}  (log: {log})", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            wait_until_healthy(url + "/health", [proc], timeout_s=600)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"[{name}] {exc}; see {log}") from None
        healthy_s = time.monotonic() - started
        if wait_for_log:  # e.g. Sluice's background compile: measure the speed it reaches, say when
            print(f"    healthy after {healthy_s:.0f} s; waiting for {wait_for_log!r} in its log", flush=True)
            while wait_for_log not in (text := log.read_text()) and "serving eagerly" not in text:
                if proc.poll() is not None:
                    raise SystemExit(f"[{name}] exited; see {log}")
                time.sleep(2)
            seen = wait_for_log if wait_for_log in text else "compile failed: serving eagerly"
            print(f"    {seen!r} after {time.monotonic() - started:.0f} s", flush=True)
        else:
            print(f"    healthy after {healthy_s:.0f} s", flush=True)
        yield url
    finally:
        stop(proc, 60)


def llamacpp_cmd(binary: Path, model: Path, port: int, ctx: int, parallel: int) -> list[str]:
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(CORES), "--threads-batch", str(CORES), "--parallel", str(parallel),
           "--ctx-size", str(ctx), "--no-webui"]
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    help_text = proc.stdout + proc.stderr
    if "--kv-unified" in help_text:
        cmd.append("--kv-unified")  # one KV pool for all slots: a slot may hold the whole context
    return [c for c in cmd if c != "--no-webui" or "--no-webui" in help_text]


def sluice_cmd(port: int, flags: str, max_total: int) -> list[str]:
    # Request limits (not speed knobs) raised so the long-prompt and prefix scenarios fit, as llama.cpp's
    # --ctx-size is; the defaults (TGI's 1024/2048) would refuse a 1,500-token prompt.
    return [sys.executable, "-m", "sluice", "serve", "--hostname", "127.0.0.1", "--port", str(port),
            "--max-input-tokens", str(max_total - 1), "--max-total-tokens", str(max_total), *shlex.split(flags)]


# --- load generator --------------------------------------------------------------------------------

def make_prompt(rng: random.Random, words: int) -> str:
    """A distinct run of words; a random serial first so even two equal draws differ at token one."""
    return f"{rng.randrange(10**9)} " + " ".join(rng.choice(WORDS) for _ in range(max(1, words - 1)))


@dataclass
class Result:
    start: float
    stamps: list[float] = field(default_factory=list)  # arrival time of each SSE chunk that has text
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


def completion_request(prompt: str, max_tokens: int) -> dict:
    """The benchmark's one request body, for every load generator: greedy, `max_tokens` forced, streamed, usage."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Result:
    """One streaming /v1/completions request.

    Token counting, the same for both servers: output tokens = usage.completion_tokens when the server
    sends usage (both do with stream_options.include_usage; llama.cpp also puts it in its last chunk),
    else the number of SSE chunks carrying text. TTFT = first chunk with text; ITL = gaps between chunks
    with text (as vLLM's benchmark_serving: a chunk that carries several tokens counts as one gap).
    """
    body = completion_request(prompt, max_tokens)
    res = Result(start=time.perf_counter())
    chunks = 0
    try:
        async for event in stream_events(client, url + "/v1/completions", body, res):
            if any(c.get("text") for c in event.get("choices") or []):
                res.stamps.append(time.perf_counter())
                chunks += 1
            usage = event.get("usage")
            if usage:
                res.output_tokens = usage.get("completion_tokens") or 0
                res.prompt_tokens = usage.get("prompt_tokens")
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.output_tokens = res.output_tokens or chunks
    return res


async def stream_events(client: httpx.AsyncClient, url: str, body: dict, res: Result) -> AsyncIterator[dict]:
    """The JSON events of one streaming POST, until the end of the body; a refusal or an error event
    ends it with `res.error` set."""
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return
        async for line in r.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else "[DONE]"
            if data == "[DONE]":
                continue  # read to the end of the body: a break would leave the stream half-closed
            event = json.loads(data)
            if "error" in event:
                res.error = str(event["error"])[:200]
                return
            yield event


def limits(concurrency: int) -> httpx.Limits:
    """A new connection per request, for both servers alike: llama-server's cpp-httplib drops kept-alive
    connections (after a few requests or seconds), which httpx then reports as a failed request.
    A localhost connect costs well under a millisecond of TTFT."""
    return httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int | list[int]) -> tuple[list[Result], float]:
    """All `prompts` through at most `concurrency` in flight (`max_tokens`: one for all, or one per prompt);
    the results and the wall time."""
    queue = list(reversed(list(zip(prompts, per_prompt(max_tokens, len(prompts))))))
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits(concurrency)) as client:
        async def worker() -> None:
            while queue:
                prompt, tokens = queue.pop()
                results.append(await one_request(client, url, prompt, tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def per_prompt(max_tokens: int | list[int], n: int) -> list[int]:
    return [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.stamps]
    ttft = [1000 * (r.stamps[0] - r.start) for r in ok]
    itl = [1000 * (b - a) for r in ok for a, b in zip(r.stamps, r.stamps[1:])]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens]
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall, "req_s": len(ok) / wall if wall else None, "tok_s": out_tokens / wall if wall else None,
        "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
        "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
        "out_per_req": out_tokens / len(ok) if ok else None,
        "prompt_tokens": statistics.mean(prompt) if prompt else None,
    }


async def shared_prefix(url: str, rng: random.Random, prefix_words: int, suffix_words: int,
                        max_tokens: int, pairs: int = 3) -> dict:
    """Sequential pairs: prefix+A (cold) then prefix+B; medians of the first and second TTFT."""
    first, second = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits(1)) as client:
        for _ in range(pairs):
            prefix = make_prompt(rng, prefix_words)
            a = await one_request(client, url, prefix + " " + make_prompt(rng, suffix_words), max_tokens)
            b = await one_request(client, url, prefix + " " + make_prompt(rng, suffix_words), max_tokens)
            for r in (a, b):
                if r.error or not r.stamps:
                    return {"error": r.error or "no tokens"}
            first.append(1000 * (a.stamps[0] - a.start))
            second.append(1000 * (b.stamps[0] - b.start))
    f, s = statistics.median(first), statistics.median(second)
    return {"ttft_first": f, "ttft_second": s, "second_over_first": s / f if f else None,
            "prompt_tokens": b.prompt_tokens, "out_per_req": b.output_tokens}


def measure(url: str, args: argparse.Namespace, seed: int) -> dict[str, dict]:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        # Warm-up, not measured: a couple of short requests (first-call allocations, kernel selection).
        loop.run_until_complete(drive(url, [make_prompt(rng, args.prompt_tokens) for _ in range(2)], 2, 4))
        scenarios: dict[str, dict] = {}
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            prompts = [make_prompt(rng, args.prompt_tokens) for _ in range(n)]
            scenarios[f"c={c}"] = summarize(*loop.run_until_complete(drive(url, prompts, c, args.output_tokens)))
            print(f"    c={c}: {fmt_brief(scenarios[f'c={c}'])}", flush=True)
        if args.long_prompt_tokens:  # 0: skipped
            prompts = [make_prompt(rng, args.long_prompt_tokens) for _ in range(args.requests or 8)]
            scenarios["long c=4"] = summarize(*loop.run_until_complete(drive(url, prompts, 4, args.output_tokens)))
            print(f"    long c=4: {fmt_brief(scenarios['long c=4'])}", flush=True)
        if args.prefix_tokens:  # 0: skipped
            scenarios["prefix"] = loop.run_until_complete(
                shared_prefix(url, rng, args.prefix_tokens, args.prompt_tokens // 4 or 8, args.output_tokens))
            print(f"    prefix: {scenarios['prefix']}", flush=True)
        return scenarios
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def measure_in_turns(servers: list[tuple[str, contextlib.AbstractContextManager[str]]],
                     args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """Every server up at once; round after round each runs every scenario in turn while the others idle,
    on that round's prompts (the same for every server, fresh each round). On a shared host the speed drifts
    over minutes: servers measured one after another, minutes apart, differed by as much as the drift
    (one stream's ITL by up to 20% from one run to the next). Each figure: the median over the rounds."""
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(server) for name, server in servers}
        rounds: dict[str, list[dict[str, dict]]] = {name: [] for name in urls}
        for r in range(args.rounds):
            for name, url in urls.items():
                print(f"[round {r + 1}/{args.rounds}] {name}", flush=True)
                rounds[name].append(measure(url, args, seed=1 + r))
    results: dict[str, dict[str, dict]] = {}
    for name, runs in rounds.items():
        results[name] = {}
        for scenario in runs[0]:
            cells = [run[scenario] for run in runs if "error" not in run.get(scenario, {"error": 1})]
            if not cells:
                results[name][scenario] = runs[0][scenario]
                continue
            results[name][scenario] = {**median_of(cells), "by_round": cells}
    return results


def median_of(summaries: list[dict]) -> dict:
    """Several rounds' summaries as one: each number the median over the rounds (of an even count, the mean of
    the middle two), `failed` their sum, anything else the first round's."""
    merged = {k: statistics.median(s[k] for s in summaries) if isinstance(v, (int, float))
              and all(isinstance(s.get(k), (int, float)) for s in summaries) else v for k, v in summaries[0].items()}
    if "failed" in merged:
        merged["failed"] = sum(s["failed"] for s in summaries)
    return merged


def fmt_brief(s: dict) -> str:
    return (f"{s['tok_s'] or 0:.1f} tok/s, TTFT p50 {s['ttft_p50'] or 0:.0f} ms, "
            f"out/req {s['out_per_req'] or 0:.1f}, failed {s['failed']}" + (f" {s['errors']}" if s["failed"] else ""))


# --- table -----------------------------------------------------------------------------------------

# (key, header, higher is better)
METRICS = [("req_s", "req/s", True), ("tok_s", "out tok/s", True), ("ttft_p50", "TTFT p50 ms", False),
           ("ttft_p95", "TTFT p95 ms", False), ("itl_p50", "ITL p50 ms", False), ("itl_p95", "ITL p95 ms", False),
           ("out_per_req", "out/req", None), ("prompt_tokens", "prompt tok", None), ("failed", "failed", None)]
PREFIX_METRICS = [("ttft_first", "TTFT 1st ms", False), ("ttft_second", "TTFT 2nd ms", False),
                  ("second_over_first", "2nd/1st", False), ("prompt_tokens", "prompt tok", None),
                  ("out_per_req", "out/req", None)]


def cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_table(results: dict[str, dict[str, dict]]) -> None:
    servers = list(results)
    llama = [s for s in servers if s.startswith("llama.cpp")]
    sluices = [s for s in servers if s.startswith("sluice")]
    scenarios = list(dict.fromkeys(k for s in servers for k in results[s]))
    width = max(24, *(len(s) + 2 for s in servers))
    for scenario in scenarios:
        metrics = PREFIX_METRICS if scenario == "prefix" else METRICS
        print(f"\n{scenario:<{width}}" + "".join(f"{h:>13}" for _, h, _ in metrics))
        for s in servers:
            row = results[s].get(scenario, {})
            if "error" in row:
                print(f"{s:<{width}}  failed: {row['error']}")
                continue
            print(f"{s:<{width}}" + "".join(f"{cell(row.get(k)):>13}" for k, _, _ in metrics))
        for s in sluices:
            cells = []
            for key, _, higher in metrics:
                best = best_of(results, llama, scenario, key, higher)
                mine = results[s].get(scenario, {}).get(key)
                if best is None or not mine or higher is None:
                    cells.append("-")
                else:
                    cells.append(f"{mine / best[1]:.2f}x {best[0]}")
            print(f"{s + ' / best llama':<{width}}" + "".join(f"{c:>13}" for c in cells))


def best_of(results: dict, llama: list[str], scenario: str, key: str, higher: bool | None) -> tuple[str, float] | None:
    values = [(s.split()[-1], results[s][scenario][key]) for s in llama
              if results[s].get(scenario, {}).get(key)]
    if not values or higher is None:
        return None
    return (max if higher else min)(values, key=lambda kv: kv[1])


# --- main ------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests", type=int, default=0, help="requests per scenario (default: 2 x concurrency, at least 8)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--long-prompt-tokens", type=int, default=1500)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--formats", nargs="+", default=list(LLAMA_FORMATS), choices=LLAMA_FORMATS)
    ap.add_argument("--sluice-flags", action="append", default=None,
                    help='extra `sluice serve` flags, one server per occurrence, e.g. "--dtype float32"')
    ap.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else build into the cache)")
    ap.add_argument("--llama-quantize", help="llama-quantize binary (else $LLAMA_QUANTIZE, next to llama-server, or build)")
    ap.add_argument("--model-id", default=None, help="model for both (a GGUF path); default: the embedded SmolLM2")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-sluice", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with more than 1: every server up at once, taking turns round after round (the "
                         "others idle), each figure the median over the rounds")
    ap.add_argument("--json", help="write host info, settings and raw results here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from sluice.modelfiles import resolve

    source = Path(resolve(args.model_id).path)
    host = cpu_capability()
    print(f"host: {host['cpu']}, {host['cores']} cores; torch CPU capability {host['torch_cpu_capability']}; "
          + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in host["flags"].items()), flush=True)
    print(f"model: {source}", flush=True)

    max_c = max([*args.concurrency, 4])
    per_slot = max(args.prompt_tokens, args.long_prompt_tokens, args.prefix_tokens + args.prompt_tokens)
    # Word counts are approximate token counts: leave a 1.5x margin per slot for the prompt.
    ctx = max_c * (int(per_slot * 1.5) + args.output_tokens + 16)
    # (name, a context manager that starts the server and yields its URL) for every server, in order.
    servers: list[tuple[str, contextlib.AbstractContextManager[str]]] = []
    if not args.skip_llamacpp:
        server_bin, quantize_bin = llamacpp_tools(args.llama_server, args.llama_quantize)
        for fmt, model in gguf_formats(source, quantize_bin, args.formats).items():
            port = free_port()
            cmd = llamacpp_cmd(server_bin, model, port, ctx, max_c)
            servers.append((f"llama.cpp {fmt}", serving(f"llama.cpp {fmt}", cmd, port, CACHE / f"llama-server-{fmt}.log")))
    if not args.skip_sluice:
        for i, flags in enumerate(args.sluice_flags or [""]):
            port = free_port()
            extra = flags + (f" --model-id {shlex.quote(args.model_id)}" if args.model_id else "")
            name = f"sluice {flags}".strip()
            CACHE.mkdir(parents=True, exist_ok=True)
            # The default compiles in the background: measure once it has switched to the compiled graphs.
            compiled = "" if "--no-compile" in flags or "--num-shard" in flags else "compiled the decode graphs"
            cmd = sluice_cmd(port, extra, int(per_slot * 1.5) + args.output_tokens + 16)
            servers.append((name, serving(name, cmd, port, CACHE / f"sluice-{i}.log", compiled)))
    if args.rounds <= 1:  # one server at a time
        results = {}
        for name, server in servers:
            with server as url:
                results[name] = measure(url, args, seed=1)
    else:
        results = measure_in_turns(servers, args)

    print(f"\n{args.prompt_tokens}-word prompts, {args.output_tokens} output tokens (ignore_eos), temperature 0; "
          f"long = {args.long_prompt_tokens} words at c=4; prefix = {args.prefix_tokens}-word shared prefix, sequential")
    print_table(results)
    if args.rounds > 1:
        print(f"\nby round (ITL p50 ms; prefix: 2nd TTFT ms), medians above over {args.rounds} rounds:")
        for name, scenarios in results.items():
            print(f"  {name}: " + "; ".join(
                f"{scenario} " + ", ".join(cell(c.get("itl_p50", c.get("ttft_second"))) for c in r.get("by_round", []))
                for scenario, r in scenarios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "model": str(source), "settings": vars(args),
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
