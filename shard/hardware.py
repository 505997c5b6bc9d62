"""Defaults chosen per machine: the compute dtype, the dtype the weight matrices are stored in, the KV
cache's dtype, and whether decode steps are compiled.

The rule, from bench/RESULTS.md (SmolLM2-135M, 2-core AMD EPYC hosts, same load generator):
  * On a CPU where our kernels build (x86 with AVX2 + FMA + F16C and a C++ compiler,
    shard/models/cpu_kernels.py), compute in float32 with the weight matrices stored in bfloat16: half
    the bytes a decode step reads, multiplied by our kernel. On AVX512-BF16 CPUs the weights are packed
    for vdpbf16ps (the rows rounded to bfloat16, summed in float32). Compiled engine steps, Zen 5 host
    with AVX512-BF16, against bfloat16 compute through oneDNN (the default there before): batch 1 8.1
    vs 11.1 ms, 16 16.4 vs 28.0, 64 33.5 vs 71.2. AVX2 host: the 30 layers' projections 21 -> 8-10 ms
    at batch 1, 48 -> 28 ms at 16 rows against float32 weights. `--quantize int8` too: int8 weights
    through our kernel under float32 rows (Zen 5 host, batch 1: 6.5 ms vs 8.1 with ATen's int8 kernel
    under bfloat16). `--dtype float32` keeps float32 weights (exact comparison).
  * Without the kernels: bf16 matmuls are fast only where the CPU has native bf16 (AVX512-BF16 or
    AMX): there bf16 was ~2x float32 at every batch size. On an AVX2-only host, bf16 took slow paths in
    every batched step (c=16: 17.9 tok/s bf16 vs 59.6 float32), so float32 there. GPUs: bf16.
  * Under the same conditions the KV cache is float16 (as llama.cpp's default cache): half the bytes decode
    attention reads, widened to float32 by our attention kernel as it loads them. Compiled decode steps at
    batch 16, context ~200: 62.6 -> 56.6 ms. `--kv-cache-dtype float32` keeps a float32 cache.
  * torch.compile of decode steps removes the ~8-15 ms of per-step dispatch (1.6-1.8x at batch 1 on
    CPU) but takes minutes on a small CPU, so by default it runs in the background after the shard is
    already serving eagerly (model_runner.ModelRunner.warm_up). Not with tensor parallelism (the
    collectives are not traced) and not on CUDA (never measured there).
  * The engine's CPU threads: the CPUs the process may keep busy (its affinity, capped by its cgroup's CPU
    quota, rounded down), split among the tensor-parallel ranks. torch's own default counts the affinity
    but not the quota: in a container limited to one CPU of this 2-core host (`docker run --cpus 1`, a
    Kubernetes limit of 1), two threads served 16 streams at 252 tok/s against 348 with one (bench/RESULTS.md,
    session 29); a 64-core node running a 4-CPU pod would start 64.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process can keep busy: its affinity (taskset, a cpuset, Kubernetes' static CPU manager),
    capped by its cgroup's CPU quota (`docker run --cpus`, a Kubernetes CPU limit) rounded down, at least 1.
    Rounded down: OpenMP threads past the quota are throttled together, and the fraction left over serves
    the router, which shares the container under `sluice serve`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_fs)
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota, in CPUs, over this process's cgroup and its ancestors, cgroup v2 (`cpu.max`)
    or v1 (`cpu.cfs_quota_us` over `cpu.cfs_period_us`); None where there is none (or no cgroup file system).
    Inside a container the path /proc names may be the host's while the mount shows the container's own
    cgroup at its root: the mount's root is read too."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if not controllers:  # the v2 hierarchy
            quotas += [_v2_quota(d / "cpu.max") for d in _ancestors(cgroup_fs, path)]
        elif "cpu" in controllers.split(","):
            mounts = [cgroup_fs / controllers, cgroup_fs / "cpu", cgroup_fs / "cpu,cpuacct"]
            mount = next((m for m in mounts if m.is_dir()), None)
            if mount is not None:
                quotas += [_v1_quota(d) for d in _ancestors(mount, path)]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory under `mount`, its parents', and the mount's root."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def engine_threads(requested: int | None, ranks: int) -> int:
    """The engine's torch CPU threads per rank: `requested` (--num-threads), else OMP_NUM_THREADS where it is
    set (a process's own count, as torch reads it), else the usable CPUs split among the ranks on this host
    (oversubscribed OpenMP threads stall every barrier and every collective)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // ranks)


def choose_dtype(requested: str, device: str, quantize: str | None, flags: frozenset[str] | None = None,
                 kernels: bool = False) -> str:
    """The dtype to compute in: `requested` unless "auto". `kernels`: whether our CPU kernels loaded
    (shard/models/cpu_kernels.py); they take float32 rows."""
    if quantize and requested == "float16":
        raise ValueError(f"--quantize {quantize} computes in bfloat16 or float32; drop --dtype float16")
    # --quantize leaves the choice as it is: int8 weights work under either compute dtype
    # (shard/models/quantize.py), and bf16 compute is 5x slower at batch 16 on AVX2.
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16"
    if kernels:
        return "float32"
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


def choose_matrices(requested: str, compute: str, device: str, kernels: bool) -> str:
    """The dtype the projections and vocabulary are stored in. `kernels`: whether our narrow-weight CPU
    kernels loaded (shard/models/cpu_kernels.py)."""
    if requested == "auto" and compute == "float32" and device == "cpu" and kernels:
        return "bfloat16"
    return compute


def choose_kv_cache(requested: str, compute: str, device: str, kernels: bool) -> str:
    """The KV cache's dtype. `kernels`: whether our CPU kernels loaded (their decode attention reads float16)."""
    if requested != "auto":
        return requested
    return "float16" if compute == "float32" and device == "cpu" and kernels else compute


def choose_compile(requested: bool | None, device: str, num_shard: int) -> tuple[bool, bool]:
    """(compile, in the background). `requested`: --compile (True: before healthy), --no-compile, or unset."""
    if requested is None:
        auto = device == "cpu" and num_shard == 1
        return auto, auto
    return requested, False
