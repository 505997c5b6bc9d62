"""`sluice serve | router | shard`: one command for both services, or each alone (compose, Kubernetes).

Flags use TGI's names; each also answers to its underscore spelling (`--max_concurrent_requests`).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from sluice.options import ROUTER, SHARD, add_flags, from_args, spellings, to_argv
from sluice.process import die_with_parent, exit_now, stop

log = logging.getLogger("sluice")


def build_parser() -> argparse.ArgumentParser:
    from router.config import RouterSettings
    from shard.settings import ShardSettings

    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the shard and the router together")
    add_flags(serve, ShardSettings, "serve")
    add_flags(serve, RouterSettings, "serve")
    serve.add_argument(*spellings("--shard-uds-path"), default=None,
                       help="Unix socket for router<->shard gRPC (default: a temp dir)")

    router = sub.add_parser("router", help="the HTTP router alone, in front of running shards")
    add_flags(router, RouterSettings, ROUTER)

    shard = sub.add_parser("shard", help="one shard (the model and its engine) alone")
    add_flags(shard, ShardSettings, SHARD)
    shard.add_argument(*spellings("--shard-uds-path"), default=None, help="shorthand for --address unix://PATH")

    health = sub.add_parser("health", help="probe a router (http://...) or a shard (gRPC address); exit 0 when healthy")
    health.add_argument("--address", default=None,
                        help="default: $SHARD_ADDRESS when set (shard container), else http://127.0.0.1:$PORT/health")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds")
    return parser


def _resolve_or_exit(model_id: str | None):
    from sluice.modelfiles import ModelNotFound, resolve

    try:
        return resolve(model_id)
    except ModelNotFound as exc:
        raise SystemExit(f"sluice: {exc}") from None


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"sluice: port {port} on {host} is not free ({exc.strerror}); pick another with --port") from None


def run_shard(args: argparse.Namespace) -> None:
    from shard.launch import check_bind, main
    from shard.settings import ShardSettings

    overrides = {"address": f"unix://{args.shard_uds_path}"} if args.shard_uds_path else {}
    settings = from_args(ShardSettings, args, **overrides)
    check_bind(settings)  # before the (slow) model load
    source = _resolve_or_exit(settings.model_id)
    _check_split(source, settings.num_shard, settings.compile)
    try:
        main(settings, source)
    except Exception as exc:  # a broken model folder or file: one clear line (the traceback at DEBUG)
        log.debug("shard start-up failed", exc_info=True)
        raise SystemExit(f"sluice shard: cannot load {source.path}: {type(exc).__name__}: {exc}") from None


def run_router(args: argparse.Namespace, shard_addresses: list[str] | None = None) -> None:
    from router.config import RouterSettings
    from router.app import serve

    _check_port(args.hostname, args.port)
    source = _resolve_or_exit(args.model_id)
    overrides = {"model_id": str(source.path) if args.model_id else None}
    if shard_addresses:
        overrides["shard_addresses"] = shard_addresses
    serve(from_args(RouterSettings, args, **overrides))


def _wait_for_shard(address: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    from sluice.health import wait_until_healthy

    try:
        wait_until_healthy(address, [proc], timeout)
    except RuntimeError:
        raise SystemExit(f"sluice: the shard exited with code {proc.returncode} while starting (see its log above)") from None
    except TimeoutError:
        raise SystemExit(f"sluice: the shard did not become healthy within {timeout:.0f}s") from None


class ShardSupervisor:
    """Runs the shard process and restarts it if it dies, so the router (which keeps its gRPC
    channel and reconnects) resumes serving without a restart of its own."""

    def __init__(self, argv: list[str], address: str) -> None:
        self.argv, self.address = argv, address
        self.stopping = False
        self.proc = self._spawn()
        self.restarts = 0

    def _spawn(self) -> subprocess.Popen:
        # Own session: Ctrl-C reaches only the launcher, which then stops the shard in order.
        # PDEATHSIG: if the launcher is killed outright, the shard goes with it.
        return subprocess.Popen(self.argv, start_new_session=True, preexec_fn=die_with_parent)

    def watch(self) -> None:
        while not self.stopping:
            code = self.proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            log.error("shard exited with code %s; restarting it (restart %d)", code, self.restarts)
            time.sleep(min(5, self.restarts))
            if not self.stopping:
                self.proc = self._spawn()

    def stop(self) -> None:
        self.stopping = True
        stop(self.proc, 15)


def _check_split(source, num_shard: int, compile: bool = False) -> None:
    if compile and num_shard > 1:
        raise SystemExit("sluice: --compile supports --num-shard 1 only (the tensor-parallel collectives are not compiled)")
    if num_shard > 1:
        from shard.models.loader import model_config
        from shard.parallel import check_divisible

        cfg = model_config(source)
        try:
            check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, num_shard)
        except ValueError as exc:
            raise SystemExit(f"sluice: {exc}") from None


def _preload_tokenizer(source) -> None:
    from sluice.modelfiles import load_tokenizer

    try:
        load_tokenizer(source)
    except Exception:
        pass  # the router's own load, which follows, says what is wrong


def run_serve(args: argparse.Namespace) -> None:
    from shard.settings import ShardSettings

    _check_port(args.hostname, args.port)
    source = _resolve_or_exit(args.model_id)
    _check_split(source, args.num_shard, args.compile)
    tmp = None
    if args.shard_uds_path:
        uds = args.shard_uds_path
    else:
        tmp = tempfile.mkdtemp(prefix="sluice-")
        uds = os.path.join(tmp, "shard.sock")
    address = f"unix://{uds}"
    shard = from_args(ShardSettings, args, address=address,
                      model_id=str(source.path) if args.model_id else None)
    argv = [sys.executable, "-m", "sluice", "shard", *to_argv(shard, SHARD)]
    supervisor = ShardSupervisor(argv, address)
    # The router's tokenizer (transformers' import; a GGUF's conversion, the first time) loads while the
    # shard loads its weights, not after: the router then finds it imported and converted.
    tokenizer = threading.Thread(target=_preload_tokenizer, args=(source,), daemon=True)
    tokenizer.start()
    try:
        _wait_for_shard(address, supervisor.proc)
        tokenizer.join()
        threading.Thread(target=supervisor.watch, daemon=True).start()
        run_router(args, [address])
    finally:
        supervisor.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run_health(args: argparse.Namespace) -> None:
    from sluice.health import check, default_address

    ok, message = check(args.address or default_address(), args.timeout)
    print(message)
    raise SystemExit(0 if ok else 1)


def main(argv: list[str] | None = None) -> None:
    """A whole process's life: a command that returns has finished its work (a server drained and
    stopped), and the process exits at once (sluice.process.exit_now); failures raise SystemExit."""
    from sluice import logs

    # Before gRPC starts: its EventEngine reads each message on a worker thread of its own pool, woken by its
    # poller thread, and then wakes the thread that polls the completion queue for Python. The older I/O
    # manager reads in that polling thread itself: at 16 streams ~2.9 context switches a step's message in
    # the router instead of ~8.5, and 8 us of its CPU a streamed token less (bench/RESULTS.md, session 32).
    # A GRPC_EXPERIMENTS of the user's own (even empty) is left as it is.
    os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
    logs.setup()
    args = build_parser().parse_args(argv)
    commands = {"serve": run_serve, "router": run_router, "shard": run_shard, "health": run_health}
    commands[args.command](args)
    exit_now()


if __name__ == "__main__":
    main()
