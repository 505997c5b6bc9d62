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

from sluice.process import die_with_parent, stop

log = logging.getLogger("sluice")


def _add(parser: argparse.ArgumentParser, flag: str, **kw) -> None:
    names = [flag]
    if "_" not in flag and "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    parser.add_argument(*names, **kw)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _model_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--model-id", default=os.environ.get("MODEL_ID"),
         help="a folder (config.json + *.safetensors), a .gguf file or a Hub id; default: the embedded SmolLM2-135M-Instruct")


def _shard_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--dtype", default=os.environ.get("DTYPE", "bfloat16"), choices=["bfloat16", "float32", "float16"])
    _add(p, "--num-shard", type=int, default=_env_int("NUM_SHARD", 1),
         help="tensor-parallel processes holding one copy of the model between them")
    _add(p, "--device", default=os.environ.get("DEVICE", "auto"), help="cpu, cuda or auto")
    _add(p, "--max-batch-total-tokens", type=int, default=_env_int("MAX_BATCH_TOTAL_TOKENS", 32768),
         help="KV cache capacity in tokens, shared by all running sequences")
    _add(p, "--max-batch-prefill-tokens", type=int, default=_env_int("MAX_BATCH_PREFILL_TOKENS", 512),
         help="tokens computed per engine step; longer prompts are split across steps")
    _add(p, "--max-batch-size", type=int, default=_env_int("MAX_BATCH_SIZE", 64), help="running sequences per step")
    _add(p, "--num-threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    _add(p, "--compile", action="store_true", default=os.environ.get("COMPILE", "") not in ("", "0"),
         help="torch.compile decode steps (num-shard 1 only): ~1.6x decode tokens/s on CPU; the shard "
              "compiles before it reports healthy (about 2 minutes on 2 cores)")


def _router_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--hostname", default=os.environ.get("HOSTNAME_BIND", "0.0.0.0"))
    _add(p, "--port", type=int, default=_env_int("PORT", 8080))
    _add(p, "--max-concurrent-requests", type=int, default=_env_int("MAX_CONCURRENT_REQUESTS", 128))
    _add(p, "--max-input-tokens", type=int, default=_env_int("MAX_INPUT_TOKENS", 1024))
    _add(p, "--max-total-tokens", type=int, default=_env_int("MAX_TOTAL_TOKENS", 2048))
    _add(p, "--api-key", default=os.environ.get("SLUICE_API_KEY"), help="require `Authorization: Bearer KEY`")
    _add(p, "--max-body-bytes", type=int, default=_env_int("MAX_BODY_BYTES", 4 * 1024 * 1024),
         help="larger request bodies get 413 without being read")
    _add(p, "--shutdown-timeout", type=float, default=float(os.environ.get("SHUTDOWN_TIMEOUT", 30)),
         help="seconds in-flight requests may take to finish after SIGTERM")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the shard and the router together")
    _model_flags(serve)
    _shard_flags(serve)
    _router_flags(serve)
    _add(serve, "--shard-uds-path", default=None, help="Unix socket for router<->shard gRPC (default: a temp dir)")

    router = sub.add_parser("router", help="the HTTP router alone, in front of running shards")
    _model_flags(router)
    _router_flags(router)
    _add(router, "--shard-address", action="append", default=None,
         help="shard gRPC address: unix:///path.sock or host:port; repeat for replicas (default unix:///tmp/sluice-shard.sock)")
    _add(router, "--shard-tls-ca", default=os.environ.get("SHARD_TLS_CA"),
         help="PEM CA certificate: connect to host:port shards over TLS, trusting it")

    shard = sub.add_parser("shard", help="one shard (the model and its engine) alone")
    _model_flags(shard)
    _shard_flags(shard)
    _add(shard, "--address", default=os.environ.get("SHARD_ADDRESS", "unix:///tmp/sluice-shard.sock"),
         help="where to serve gRPC: unix:///path.sock or host:port (binding beyond localhost is explicit)")
    _add(shard, "--shard-uds-path", default=None, help="shorthand for --address unix://PATH")
    _add(shard, "--allow-remote", action="store_true", help="allow an --address that other hosts can reach")
    _add(shard, "--tls-cert", default=os.environ.get("SHARD_TLS_CERT"), help="PEM certificate: serve gRPC over TLS")
    _add(shard, "--tls-key", default=os.environ.get("SHARD_TLS_KEY"), help="PEM private key for --tls-cert")
    _add(shard, "--shutdown-timeout", type=float, default=float(os.environ.get("SHUTDOWN_TIMEOUT", 30)),
         help="seconds requests in flight may take to finish after SIGTERM (new ones are refused)")

    health = sub.add_parser("health", help="probe a router (http://...) or a shard (gRPC address); exit 0 when healthy")
    _add(health, "--address", default=None,
         help="default: $SHARD_ADDRESS when set (shard container), else http://127.0.0.1:$PORT/health")
    _add(health, "--timeout", type=float, default=5.0, help="seconds")
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

    address = f"unix://{args.shard_uds_path}" if args.shard_uds_path else args.address
    # `sluice serve` passes only its Unix socket; these flags exist on `sluice shard` alone.
    remote = {k: getattr(args, k, None) for k in ("allow_remote", "tls_cert", "tls_key")}
    check_bind(ShardSettings(address=address, **remote))  # before the (slow) model load
    source = _resolve_or_exit(args.model_id)
    _check_split(source, args.num_shard, args.compile)
    settings = ShardSettings(
        model_id=args.model_id,
        address=address,
        dtype=args.dtype,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_batch_size=args.max_batch_size,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        num_threads=args.num_threads,
        num_shard=args.num_shard,
        device=args.device,
        allow_remote=bool(remote["allow_remote"]),
        tls_cert=remote["tls_cert"],
        tls_key=remote["tls_key"],
        shutdown_timeout_s=args.shutdown_timeout,
        compile=args.compile,
    )
    try:
        main(settings, source)
    except Exception as exc:  # a broken model folder or file: one clear line (the traceback at DEBUG)
        log.debug("shard start-up failed", exc_info=True)
        raise SystemExit(f"sluice shard: cannot load {source.path}: {type(exc).__name__}: {exc}") from None


def run_router(args: argparse.Namespace, shard_addresses: list[str] | None = None) -> None:
    from router.app import serve
    from router.config import RouterSettings

    _check_port(args.hostname, args.port)
    source = _resolve_or_exit(args.model_id)
    settings = RouterSettings(
        hostname=args.hostname,
        port=args.port,
        model_id=str(source.path) if args.model_id else None,
        shard_addresses=shard_addresses or args.shard_address or ["unix:///tmp/sluice-shard.sock"],
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
        shard_tls_ca=getattr(args, "shard_tls_ca", None),
    )
    serve(settings)


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


def run_serve(args: argparse.Namespace) -> None:
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
    argv = [sys.executable, "-m", "sluice", "shard", "--address", address, "--dtype", args.dtype,
            "--max-batch-total-tokens", str(args.max_batch_total_tokens),
            "--max-batch-prefill-tokens", str(args.max_batch_prefill_tokens),
            "--max-batch-size", str(args.max_batch_size), "--num-shard", str(args.num_shard),
            "--device", args.device, "--shutdown-timeout", str(args.shutdown_timeout)]
    if args.model_id:
        argv += ["--model-id", str(source.path)]
    if args.num_threads:
        argv += ["--num-threads", str(args.num_threads)]
    if args.compile:
        argv += ["--compile"]
    supervisor = ShardSupervisor(argv, address)
    try:
        _wait_for_shard(address, supervisor.proc)
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
    from sluice import logs

    logs.setup()
    args = build_parser().parse_args(argv)
    commands = {"serve": run_serve, "router": run_router, "shard": run_shard, "health": run_health}
    commands[args.command](args)


if __name__ == "__main__":
    main()
