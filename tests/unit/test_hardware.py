"""The per-machine defaults (shard/hardware.py): the rule the README states, on given CPU flags."""
from __future__ import annotations

import pytest

from shard.hardware import choose_compile, choose_dtype, choose_kv_cache, choose_matrices


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
