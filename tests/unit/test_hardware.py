"""The per-machine defaults (shard/hardware.py): the rule the README states, on given CPU flags and cgroup files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shard.hardware import (cgroup_cpu_quota, choose_compile, choose_dtype, choose_kv_cache, choose_matrices,
                            engine_threads, usable_cpus)


def test_float32_rows_wherever_our_kernels_run():
    """Our kernels take float32 rows (bf16 weights, packed for AVX512-BF16 where the CPU has it, or int8)."""
    native = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_bf16"})
    assert choose_dtype("auto", "cpu", None, native, kernels=True) == "float32"
    assert choose_dtype("auto", "cpu", "int8", native, kernels=True) == "float32"
    assert choose_dtype("bfloat16", "cpu", None, native, kernels=True) == "bfloat16"
    assert choose_dtype("auto", "cuda:0", None, frozenset(), kernels=True) == "bfloat16"


def test_without_the_kernels_bf16_only_where_the_cpu_has_native_bf16():
    assert choose_dtype("auto", "cpu", None, frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert choose_dtype("auto", "cpu", None, frozenset({"avx2", "amx_bf16"})) == "bfloat16"
    assert choose_dtype("auto", "cpu", None, frozenset({"avx2", "fma", "avx512f"})) == "float32"
    assert choose_dtype("auto", "cuda:0", None, frozenset()) == "bfloat16"


def test_an_explicit_dtype_wins_and_int8_computes_in_the_machines_dtype():
    assert choose_dtype("float32", "cpu", None, frozenset({"avx512_bf16"})) == "float32"
    assert choose_dtype("auto", "cpu", "int8", frozenset({"avx2"})) == "float32"
    assert choose_dtype("auto", "cpu", "int8", frozenset({"avx512_bf16"})) == "bfloat16"
    assert choose_dtype("float32", "cpu", "int8", frozenset({"avx512_bf16"})) == "float32"
    with pytest.raises(ValueError, match="float16"):
        choose_dtype("float16", "cpu", "int8")


def test_bf16_matrices_under_float32_compute_only_by_default_on_cpus_with_the_kernels():
    assert choose_matrices("auto", "float32", "cpu", kernels=True) == "bfloat16"
    assert choose_matrices("auto", "float32", "cpu", kernels=False) == "float32"
    assert choose_matrices("float32", "float32", "cpu", kernels=True) == "float32"  # exact comparison
    assert choose_matrices("auto", "bfloat16", "cpu", kernels=True) == "bfloat16"
    assert choose_matrices("auto", "float32", "cuda:0", kernels=True) == "float32"


def test_a_float16_kv_cache_by_default_where_our_cpu_attention_reads_it():
    assert choose_kv_cache("auto", "float32", "cpu", kernels=True) == "float16"
    assert choose_kv_cache("auto", "float32", "cpu", kernels=False) == "float32"
    assert choose_kv_cache("auto", "bfloat16", "cpu", kernels=True) == "bfloat16"
    assert choose_kv_cache("auto", "bfloat16", "cuda:0", kernels=False) == "bfloat16"
    assert choose_kv_cache("auto", "float32", "cuda:0", kernels=True) == "float32"
    assert choose_kv_cache("float32", "float32", "cpu", kernels=True) == "float32"


def test_compile_defaults_to_the_background_on_one_cpu_shard():
    assert choose_compile(None, "cpu", 1) == (True, True)
    assert choose_compile(None, "cpu", 2) == (False, False)
    assert choose_compile(None, "cuda:0", 1) == (False, False)
    assert choose_compile(True, "cpu", 1) == (True, False)
    assert choose_compile(False, "cpu", 1) == (False, False)


# --- the engine's CPU threads: affinity capped by the cgroup's quota -------------------------------------

def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_a_cgroup_v2_quota_is_the_tightest_over_the_cgroup_and_its_ancestors(tmp_path):
    """A Kubernetes pod: the pod's limit (4 CPUs) above the container's (2.5): 2 threads, rounded down."""
    _tree(tmp_path, {"proc": "0::/kubepods/pod1/ctr\n", "fs/cpu.max": "max 100000\n",
                     "fs/kubepods/pod1/cpu.max": "400000 100000\n", "fs/kubepods/pod1/ctr/cpu.max": "250000 100000\n"})
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "fs") == 2.5
    assert usable_cpus(tmp_path / "proc", tmp_path / "fs") == min(len(os.sched_getaffinity(0)), 2)


def test_a_cgroup_v1_quota_inside_a_container_is_read_at_the_mounts_root(tmp_path):
    """Docker on cgroup v1 without a cgroup namespace: /proc names the host's path, the mount shows the
    container's own cgroup at its root. `--cpus 1.5` leaves one whole CPU to the engine."""
    _tree(tmp_path, {"proc": "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
                     "fs/cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "fs") == 1.5
    assert usable_cpus(tmp_path / "proc", tmp_path / "fs") == 1


def test_no_quota_leaves_the_affinity(tmp_path):
    _tree(tmp_path, {"proc": "3:cpu:/\nnot a cgroup line\n0::/\n", "fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n",
                     "fs/cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "fs") is None
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "fs") is None
    assert usable_cpus(tmp_path / "proc", tmp_path / "fs") == len(os.sched_getaffinity(0))


def test_the_engine_threads_follow_the_affinity_and_split_among_ranks(monkeypatch):
    """In a process pinned to one CPU (taskset, a cpuset), one thread; --num-threads wins."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from shard.hardware import engine_threads; print(engine_threads(None, 1), engine_threads(3, 1))")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "3"]
    assert engine_threads(None, 2) == max(1, usable_cpus() // 2)
    assert engine_threads(None, 10**6) == 1


def test_omp_num_threads_is_honoured_as_torch_honours_it(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads(None, 1) == 3
    assert engine_threads(5, 1) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert engine_threads(None, 1) == usable_cpus()
