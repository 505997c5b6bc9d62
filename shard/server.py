"""The shard's gRPC service: token ids in, a stream of sampled tokens out.

The engine runs in its own thread; each Generate call owns an asyncio queue that the engine
thread feeds through `call_soon_threadsafe`. When the router cancels the call, the handler's
`finally` marks the sequence cancelled and the engine frees it before its next step.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from shard.engine import FINISH_EOS, Draining, Engine, EngineConfig, Sequence, run_worker
from shard.grammar import GrammarCompiler
from shard.models.loader import load_model, model_config
from shard.parallel import TPGroup, broadcast_step, check_divisible, init_group
from shard.sampler import Sampled, SamplingParams
from sluice import shard_pb2 as pb
from sluice.process import die_with_parent
from sluice import shard_pb2_grpc as pb_grpc
from sluice.logs import METADATA_KEY, REQUEST_ID
from sluice.modelfiles import ModelSource

log = logging.getLogger("sluice.shard")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ShardSettings:
    model_id: str | None = None
    address: str = "unix:///tmp/sluice-shard.sock"
    dtype: str = "bfloat16"
    kv_cache_tokens: int = 32768
    block_size: int = 16
    max_batch_size: int = 64
    max_batch_prefill_tokens: int = 512
    num_threads: int | None = None
    num_shard: int = 1
    device: str = "auto"  # cpu, cuda, or auto (cuda when there is one)
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
    allow_remote: bool = False  # serve gRPC on an address other hosts can reach
    tls_cert: str | None = None  # PEM files: serve gRPC over TLS
    tls_key: str | None = None
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    compile: bool = False  # torch.compile decode-only steps (num_shard 1 only)


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


class ShardService(pb_grpc.ShardServicer):
    def __init__(self, engine: Engine, source: ModelSource, settings: ShardSettings) -> None:
        self.engine = engine
        self.source = source
        self.settings = settings
        self.grammars = GrammarCompiler(source, engine.model.cfg.vocab_size)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        cfg = self.engine.model.cfg
        return pb.InfoResponse(
            model_id=self.source.model_id,
            dtype=self.settings.dtype,
            device=str(self.engine.device),
            num_shard=self.engine.model.tp.size,
            max_position_embeddings=self.engine.max_seq_len,
            vocab_size=cfg.vocab_size,
            eos_token_ids=sorted(self.engine.eos),
            kv_cache_tokens=self.engine.blocks.num_blocks * self.engine.blocks.block_size,
            max_batch_size=self.engine.config.max_batch_size,
            block_size=self.engine.blocks.block_size,
        )

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        running, waiting, free = self.engine.stats()
        return pb.HealthResponse(ok=self.engine.alive(), running=running, waiting=waiting, free_kv_blocks=free)

    async def Generate(self, request: pb.GenerateRequest, context):
        REQUEST_ID.set(dict(context.invocation_metadata()).get(METADATA_KEY, "-"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        p = request.params
        params = SamplingParams(
            do_sample=p.do_sample,
            temperature=p.temperature or 1.0,
            top_k=p.top_k,
            top_p=p.top_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=p.seed if p.HasField("seed") else None,
            typical_p=p.typical_p or 1.0,
        )
        vocab = self.engine.model.cfg.vocab_size
        if any(t >= vocab for t in (*request.input_ids, *p.logit_bias)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be below the vocabulary size {vocab}")
        if p.logit_bias:
            params.logit_bias = (torch.tensor(list(p.logit_bias.keys())), torch.tensor(list(p.logit_bias.values())))
        matcher = None
        if request.grammar:
            try:  # compiling takes milliseconds to a second: never on the engine thread
                matcher = await asyncio.to_thread(self.grammars.matcher, request.grammar)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        eos = frozenset(request.stop_token_ids)
        seq = Sequence(
            request.request_id,
            list(request.input_ids),
            params,
            request.max_new_tokens or 1,
            lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)),
            stop_token_ids=eos,
            top_n_tokens=request.top_n_tokens,
            ignore_eos=request.ignore_eos,
            matcher=matcher,
            prompt_logprobs=request.prompt_logprobs,
        )
        try:
            self.engine.submit(seq)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Draining as exc:  # UNAVAILABLE: the router may send it to another replica
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        first, done = True, False
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():  # the router fell behind: send what is ready at once
                    batch.append(events.get_nowait())
                msg = pb.GenerateResponse()
                if first:
                    msg.prompt_tokens = seq.prompt_len
                    msg.seed = params.seed or 0
                    if seq.prefill is not None:
                        msg.prefill.extend(pb.Token(id=i, logprob=lp) for i, lp in zip(seq.token_ids, seq.prefill))
                    first = False
                done = False
                for kind, value in batch:
                    if kind == "error":
                        log.warning("generation failed: %s", value)
                        await context.abort(grpc.StatusCode.INTERNAL, str(value))
                    msg.tokens.append(_token(value))
                    if value.finish:
                        msg.finish_reason = pb.FINISH_REASON_EOS if value.finish == FINISH_EOS else pb.FINISH_REASON_LENGTH
                        done = True
                yield msg
                if done:
                    return
        finally:
            self.engine.cancel(seq)  # no-op when finished; frees the sequence when the call was cancelled
            # One line per request, with its id and sizes only: prompt text never reaches the shard.
            log.info("generate %s: %d prompt tokens, %d generated", "finished" if done else "ended early",
                     seq.prompt_len, len(seq.token_ids) - seq.prompt_len)


def _token(s: Sampled) -> pb.Token:
    return pb.Token(id=s.token_id, logprob=s.logprob, top_tokens=[pb.TopToken(id=i, logprob=lp) for i, lp in s.top])


def _device(settings: ShardSettings, tp: TPGroup) -> str:
    if settings.device == "auto":
        return f"cuda:{tp.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return settings.device


def _engine_config(settings: ShardSettings) -> EngineConfig:
    return EngineConfig(
        kv_cache_tokens=settings.kv_cache_tokens,
        block_size=settings.block_size,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_prefill_tokens,
        compile=settings.compile,
    )


def _load(settings: ShardSettings, source: ModelSource, tp: TPGroup):
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    elif tp.size > 1 and not torch.cuda.is_available():
        # Ranks on one host share its cores: oversubscribed OpenMP threads stall every collective.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    t0 = time.time()
    model = load_model(source, DTYPES[settings.dtype], tp, _device(settings, tp))
    log.info("rank %d/%d loaded %s (%s) in %.1fs", tp.rank, tp.size, source.model_id, settings.dtype, time.time() - t0)
    return model


def build_engine(settings: ShardSettings, source: ModelSource, tp: TPGroup | None = None) -> Engine:
    model = _load(settings, source, tp or TPGroup())
    engine = Engine(model, _engine_config(settings), model.cfg.eos_token_ids)
    engine.warm_up()  # before the shard reports healthy: a request never waits on a compile
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
        run_worker(_load(settings, source, tp), _engine_config(settings))
        return
    serve(settings, source, tp, children)


def _watch_ranks(engine: Engine, children: list[subprocess.Popen]) -> None:
    # One rank gone breaks every collective: fail the in-flight requests with a clear error,
    # then take the whole group down (the launcher or Kubernetes restarts it).
    while True:
        for r, child in enumerate(children, start=1):
            code = child.poll()
            if code is not None and not engine._stop:
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
    ready = threading.Event()
    box: dict = {}
    grpc_thread = threading.Thread(target=lambda: asyncio.run(_serve_grpc(engine, source, settings, ready, box)),
                                   name="grpc", daemon=True)
    grpc_thread.start()
    ready.wait()
    if "error" in box:
        raise SystemExit(box["error"])
    if children:
        threading.Thread(target=_watch_ranks, args=(engine, children), daemon=True).start()
    # SIGTERM drains (a second one, or SIGINT, stops at once): Kubernetes and compose send it before
    # SIGKILL, and requests in flight should finish rather than fail.
    signal.signal(signal.SIGTERM, lambda *_: engine.stop() if engine.drain_deadline else engine.drain(settings.shutdown_timeout_s))
    signal.signal(signal.SIGINT, lambda *_: engine.stop())
    engine.run()
    box["loop"].call_soon_threadsafe(box["stop"].set)
    grpc_thread.join(timeout=5)
    if tp is not None and tp.size > 1 and engine.failed is None:
        broadcast_step(None)  # release the other ranks
    for child in children or []:
        child.wait(timeout=10)


async def _serve_grpc(engine: Engine, source: ModelSource, settings: ShardSettings,
                      ready: threading.Event, box: dict) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ShardServicer_to_server(ShardService(engine, source, settings), server)
    try:
        if settings.tls_cert:
            with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = server.add_secure_port(settings.address, credentials)
        else:
            port = server.add_insecure_port(settings.address)
    except (RuntimeError, OSError) as exc:
        port, box["error"] = 0, f"shard: cannot listen on {settings.address}: {exc}"
    if port == 0:
        box.setdefault("error", f"shard: cannot listen on {settings.address} (in use?)")
        engine.stop()
        ready.set()
        return
    await server.start()
    box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
    log.info("shard ready on %s", settings.address)
    ready.set()
    await box["stop"].wait()
    await server.stop(grace=2)
