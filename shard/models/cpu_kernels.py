"""Our CPU kernels, built with the machine's C++ compiler at first use, then cached:
  * cpu_linear.cpp: float32 rows times bfloat16 weights, and times int8 weights with a float32 scale
    per row; on CPUs with AVX512-BF16, times bfloat16 or int8 weights packed for vdpbf16ps (`pack`);
  * cpu_attention.cpp: decode attention over float32 or float16 paged KV caches, read in place;
  * cpu_sampling.cpp: each sampling row's argmax and logsumexp from one read of its logits, and the
    constrained rows' grammar masks (llguidance's bitmask applied in place).

Why our own: a decode step reads every weight once, so at small batches its time is the bytes read,
and on CPUs without native bf16 (AVX2) no library we have reads narrow weights at memory speed.
Measured on the 2-core AVX2 host, SmolLM2-135M's 30 layers of projections (bench/RESULTS.md, session 22):

  rows                      1         16        256
  float32, MKL (ours)       21 ms     48 ms     371 ms
  bfloat16, this kernel     8-10 ms   28 ms     344-363 ms  (16 rows: 34 ms before the strips' widening
                                                          moved between the FMAs, cpu_linear.cpp)
  int8, this kernel         5-6 ms    27 ms     346 ms      (16 rows: 31 ms before)
  int8, ATen _weight_int8pack_mm (bf16 rows)  11.4 ms at 1 row
  bf16 -> float32 copy, then MKL              61 ms at 1 row

So on such CPUs the default keeps weights in bfloat16 and computes in float32 (shard/hardware.py):
half the bytes of float32, as fast as MKL's float32 for prompt chunks. Decode attention: inductor's
fused gather-and-reduce cost 13 ms a step for context 20 -> 200 at batch 16, the kernel 7 ms. Where the
kernels cannot be built (no compiler, not x86 with AVX2 + FMA) the weights stay in the compute dtype
and attention runs in PyTorch, as before.

On CPUs with AVX512-BF16 (Zen 4/5, Sapphire Rapids and later) the bfloat16 weights are packed so that
vdpbf16ps multiplies 32 of them per instruction into 16 output columns, the rows rounded to bfloat16
(as oneDNN's bf16 matmul does, but summed and stored in float32). The 30 layers' projections on a
2-core Zen 5 host, each layer's own weights (212 MB, read from memory; bench/RESULTS.md, session 25):

  rows                          1        4        16       64       512 (compute-bound)
  bfloat16, the AVX2 kernel     5.1 ms   8.0 ms   20.8 ms  71.9 ms  533 ms
  bfloat16 rows, oneDNN         12.9     14.2     17.3     38.2     153
  packed, vdpbf16ps             4.1      5.3      7.9      21.2     132

Unpacked weights (int8, and bfloat16 where there is no AVX512-BF16) are streamed 16 at a time on AVX-512
CPUs for up to 8 rows, 8 at a time elsewhere: int8 layers at 1 row 2.57-2.78 -> 2.49-2.55 ms, 2 rows
3.15-3.31 -> 2.70-3.06, 4 rows 5.83-6.01 -> 4.10-4.55 (Zen 5, session 26).

int8 weights are packed too on AVX512-BF16 CPUs (session 28): up to 8 rows they stream through float32
registers as the unpacked ones do; past 8 a strip of four column blocks is widened to bfloat16 (exactly)
into a buffer in L2 and multiplied with vdpbf16ps, the rows rounded to bfloat16. The 30 layers, Zen 5:

  rows                          1           4      16      64      512
  int8, unpacked                2.33-2.42   4.26   16.5    54.5    455 ms
  int8, packed                  2.33-2.49   3.46   8.8     19.4    117
  (widened in the buffer at every row count, 1 row took 5.75 ms: why the stream below 9)
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shard.hardware import cpu_flags

log = logging.getLogger("sluice.shard")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_linear.cpp", "cpu_attention.cpp", "cpu_sampling.cpp")]
HEADERS = [Path(__file__).with_name("cpu_vec.h")]
PACKAGE_DIR = SOURCES[0].parent
_loaded: bool | None = None


def supported(flags: frozenset[str] | None = None) -> bool:
    """The kernels' instructions: x86-64 with AVX2, FMA and F16C."""
    flags = cpu_flags() if flags is None else flags
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= flags


def _compile_command(output: Path) -> list[str]:
    from torch.utils import cpp_extension

    openmp = "OpenMP" in torch.__config__.parallel_info()
    threads = ["-fopenmp", "-DAT_PARALLEL_OPENMP=1"] if openmp else ["-DAT_PARALLEL_NATIVE=1"]
    return [
        os.environ.get("CXX", "g++"), "-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-w", "-shared", "-fPIC", *threads,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *map(str, SOURCES), "-o", str(output),
        *(f"-L{p}" for p in cpp_extension.library_paths()), "-ltorch_cpu", "-lc10",
    ]


def library_name() -> str:
    """The built library's file name: changes with the source, torch and the build command."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode()
                         + " ".join(_compile_command(Path("out"))).encode()).hexdigest()[:16]
    return f"cpu_kernels-{key}.so"


def _cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice")) / "kernels"


def build(directory: Path) -> Path:
    """Compile into `directory` (~8 s on 2 cores). Written under a temporary name and renamed, so ranks
    building at once never load a half-written file."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / library_name()
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.part")
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise OSError(f"compiling the CPU kernels failed: {done.stderr.strip()[-2000:]}")
        # mkstemp's file is private (0600, and the linker kept that): an image built as root and run
        # as another user could not load it.
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def load() -> bool:
    """Build if needed and load the kernels, once per process. False (and a log line saying why) where
    they cannot run here: the model then keeps its weights in the compute dtype."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if not supported():
        log.info("narrow-weight CPU kernels need x86-64 with AVX2 + FMA: weights stay in the compute dtype")
        return False
    # A library built into the package (container images: `python -m shard.models.cpu_kernels`), else the cache.
    name = library_name()
    path = next((p for p in (PACKAGE_DIR / name, _cache_dir() / name) if p.exists()), None)
    if path is None:
        try:
            path = build(_cache_dir())
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("could not build the narrow-weight CPU kernels, weights stay in the compute dtype: %s", e)
            return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("could not load the narrow-weight CPU kernels (%s), weights stay in the compute dtype: %s", path, e)
        return False
    # Shapes for torch.compile, which traces the graph without running the kernels.
    torch.library.register_fake("sluice::linear_bf16")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("sluice::linear_packed")(lambda x, wp: x.new_empty(x.shape[0], wp.shape[0] * 16))
    torch.library.register_fake("sluice::linear_int8")(lambda x, w, scale: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("sluice::linear_int8_packed")(
        lambda x, wp, scale: x.new_empty(x.shape[0], wp.shape[0] * 16))
    torch.library.register_fake("sluice::decode_attention")(
        lambda q, k_cache, v_cache, kv_slots, mask, scale: q.new_empty(q.shape[0], q.shape[1] * q.shape[2]))
    return True


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T runs in the kernels: float32 rows [M, K] on the CPU, K a multiple of 8, and
    weights in bfloat16 (perhaps `pack`ed) or int8."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.shape[1] % 8 == 0
            and w.dtype in (torch.bfloat16, torch.int8) and bool(_loaded))


def attention_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode attention runs in the kernel: float32 queries on the CPU, caches in float32 or
    float16, head size a multiple of 8."""
    return (q.dtype == torch.float32 and k_cache.dtype in (torch.float32, torch.float16) and q.device.type == "cpu"
            and q.shape[-1] % 8 == 0 and bool(_loaded))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence [B, hq, d] against its context rows (kv_slots [B, L], mask [B, 1, L]) of
    the paged caches [slots, hkv, d] -> [B, hq * d]. Check `attention_applies` first."""
    return torch.ops.sluice.decode_attention(q, k_cache, v_cache, kv_slots, mask, scale)


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's argmax (the first maximum) and logsumexp from float32 CPU logits [n, vocab]; None where
    the kernels do not run (the caller uses ATen's)."""
    if not (_loaded and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2):
        return None
    return torch.ops.sluice.argmax_logsumexp(logits)


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """In place: -inf wherever the int32 `bitmask` [n, ceil(vocab / 32)] (llguidance's layout) has a 0 bit,
    in contiguous float32 CPU logits [n, vocab]. False where the kernels do not run (the caller masks)."""
    if not (_loaded and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2
            and logits.is_contiguous()):
        return False
    torch.ops.sluice.mask_logits(logits, bitmask)
    return True


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16): then bfloat16 weights are packed for
    `linear`'s vdpbf16ps path."""
    return "avx512_bf16" in cpu_flags()


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """bfloat16 or int8 weights [N, K] packed [N / 16, K / 2, 16, 2] for cpu_linear.cpp's AVX512-BF16 path;
    None where that path does not run here or the shape does not fit it (N and K multiples of 16)."""
    if not (_loaded and native_bf16() and w.dtype in (torch.bfloat16, torch.int8) and w.dim() == 2
            and w.device.type == "cpu" and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0):
        return None
    return packed_layout(w)


def packed_layout(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 16, K / 2, 16, 2]: per block of 16 rows, their values at k and k + 1 side by side."""
    n, k = w.shape
    return w.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def packed_rows(wp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the [N, K] matrix that `pack` packed into wp: a tied vocabulary's embedding lookup."""
    return wp[rows // 16, :, rows % 16, :].flatten(-2)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x @ (w * scale[:, None]).T; `scale` (float32) with int8 weights only; w may be `pack`ed. Check
    `applies` first."""
    if w.dim() == 4:
        if scale is None:
            return torch.ops.sluice.linear_packed(x, w)
        return torch.ops.sluice.linear_int8_packed(x, w, scale)
    if scale is None:
        return torch.ops.sluice.linear_bf16(x, w)
    return torch.ops.sluice.linear_int8(x, w, scale)


if __name__ == "__main__":
    # Container images build the library into the package at image build time, where a compiler is.
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR))
