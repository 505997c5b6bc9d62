"""The shard process: load the model, join the tensor-parallel group, serve gRPC, drain on SIGTERM.

Rank 0 serves gRPC (shard/servicer.py) from a background thread while the engine loop owns the main
thread; other ranks run the model runner's worker loop.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from shard.engine import Engine, EngineConfig
from shard.hardware import choose_compile, choose_dtype, choose_kv_cache, choose_matrices, engine_threads
from shard.model_runner import ModelRunner
from shard.models import cpu_kernels, cpu_matmul
from shard.models.loader import load_model, model_config
from shard.parallel import TPGroup, check_divisible, init_group
from shard.servicer import GrpcServer
from shard.settings import ShardSettings
from sluice.modelfiles import ModelSource
from sluice.process import die_with_parent

log = logging.getLogger("sluice.shard")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def is_local(address: str) -> bool:
    """Whether only this host can reach a gRPC address: a Unix socket or a loopback host:port."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or an empty host (every interface)


def check_bind(settings: ShardSettings) -> None:
    """The shard trusts whoever reaches it (no auth of its own): reaching it from elsewhere must be asked for."""
    if not is_local(settings.address) and not settings.allow_remote:
        raise SystemExit(f"sluice shard: {settings.address} is reachable from other hosts; pass --allow-remote "
                         "to serve there (and consider --tls-cert/--tls-key), or use a Unix socket or 127.0.0.1")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SystemExit("sluice shard: --tls-cert and --tls-key go together")


def _device(settings: ShardSettings, tp: TPGroup) -> str:
    if settings.device == "auto":
        return f"cuda:{tp.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return settings.device


def _engine_config(settings: ShardSettings, device: str, tp_size: int) -> EngineConfig:
    compile, background = choose_compile(settings.compile, device, tp_size)
    return EngineConfig(
        max_batch_total_tokens=settings.max_batch_total_tokens,
        block_size=settings.block_size,
        max_batch_size=settings.max_batch_size,
        max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
        compile=compile,
        compile_in_background=background,
    )


def _load(settings: ShardSettings, source: ModelSource, tp: TPGroup):
    device = _device(settings, tp)
    if settings.num_threads or device == "cpu":
        torch.set_num_threads(engine_threads(settings.num_threads, tp.size))
    cpu_matmul.use_threads(torch.get_num_threads())
    t0 = time.time()
    # Our CPU kernels take float32 rows and narrow weights: the default's bfloat16 ones, or --quantize's int8.
    wanted = settings.dtype == "auto" or (settings.dtype == "float32" and bool(settings.quantize))
    kernels = device == "cpu" and wanted and cpu_kernels.load()
    dtype = choose_dtype(settings.dtype, device, settings.quantize, kernels=kernels)
    matrices = choose_matrices(settings.dtype, dtype, device, kernels)
    kv_cache = choose_kv_cache(settings.kv_cache_dtype, dtype, device, kernels)
    model = load_model(source, DTYPES[dtype], tp, device, settings.quantize, DTYPES[matrices], DTYPES[kv_cache])
    weights = f"{settings.quantize or matrices} weights"
    if model.layers[0].qkv_proj.dim() == 4:
        weights += " packed for AVX512-BF16"
    log.info("rank %d/%d loaded %s (%s compute, %s, %s KV cache, %d CPU threads) in %.1fs", tp.rank, tp.size,
             source.model_id, dtype, weights, kv_cache, torch.get_num_threads(), time.time() - t0)
    return model


def build_engine(settings: ShardSettings, source: ModelSource, tp: TPGroup | None = None) -> Engine:
    tp = tp or TPGroup()
    model = _load(settings, source, tp)
    engine = Engine(model, _engine_config(settings, _device(settings, tp), tp.size), model.cfg.eos_token_ids)
    engine.warm_up()  # now (--compile: before healthy) or in the background (the default on CPU)
    return engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(settings: ShardSettings, source: ModelSource) -> None:
    """Start this shard: one process, or a tensor-parallel group of `num_shard` ranks.

    Launched by hand (no RANK in the environment), rank 0 spawns ranks 1..N-1 on this host.
    Under a multi-host launcher, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT say where we are.
    """
    world = int(os.environ.get("WORLD_SIZE", settings.num_shard))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        cfg = model_config(source)
        check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, world)
    children: list[subprocess.Popen] = []
    if world > 1 and "RANK" not in os.environ:
        env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.update(env)
        for r in range(1, world):
            children.append(subprocess.Popen([sys.executable, "-m", "sluice", *sys.argv[1:]],
                                             env=dict(env, RANK=str(r)), preexec_fn=die_with_parent))
    tp = TPGroup()
    if world > 1:
        tp = init_group(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), settings.backend)
    if rank != 0:
        # Rank 0 decides when the group stops (after its drain it broadcasts the end); a rank that
        # died on the same SIGTERM, or on a terminal's Ctrl-C, would break the requests still finishing.
        # It still goes with rank 0 if that one dies (PDEATHSIG, or the collective failing).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        config = _engine_config(settings, _device(settings, tp), tp.size)
        ModelRunner(_load(settings, source, tp), config.num_blocks, config.block_size).run_worker()
        return
    serve(settings, source, tp, children)


def _watch_ranks(engine: Engine, children: list[subprocess.Popen]) -> None:
    # One rank gone breaks every collective: fail the in-flight requests with a clear error,
    # then take the whole group down (the launcher or Kubernetes restarts it).
    while True:
        for r, child in enumerate(children, start=1):
            code = child.poll()
            if code is not None and not engine.stopping:
                log.error("shard rank %d exited with code %s: stopping the group", r, code)
                engine.fail_all(f"shard rank {r} died (exit code {code})")
                time.sleep(1.0)  # let the error events reach the router
                os._exit(1)
        time.sleep(0.2)


def serve(settings: ShardSettings, source: ModelSource, tp: TPGroup | None = None,
          children: list[subprocess.Popen] | None = None) -> None:
    """Serve gRPC from a background thread while the engine loop owns the main thread."""
    engine = build_engine(settings, source, tp)

    def fatal(message: str) -> None:
        time.sleep(1.0)
        os._exit(1)

    engine.on_fatal = fatal
    server = GrpcServer(engine, source, settings)
    error = server.start()
    if error:
        engine.stop()
        raise SystemExit(error)
    if children:
        threading.Thread(target=_watch_ranks, args=(engine, children), daemon=True).start()
    # SIGTERM drains (a second one, or SIGINT, stops at once): Kubernetes and compose send it before
    # SIGKILL, and requests in flight should finish rather than fail.
    signal.signal(signal.SIGTERM, lambda *_: engine.stop() if engine.drain_deadline else engine.drain(settings.shutdown_timeout_s))
    signal.signal(signal.SIGINT, lambda *_: engine.stop())
    engine.run()
    server.stop()
    if engine.failed is None:
        engine.runner.release_workers()
    for child in children or []:
        child.wait(timeout=10)
    # Returns to sluice.cli.main, which exits at once: without waiting for a background compile either.
