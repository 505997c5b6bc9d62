"""x @ w.T in float32 on the CPU, in whichever formulation MKL runs fastest for the step's shape.

Measured on the 2-core AVX2 host (bench/RESULTS.md, session 21; SmolLM2-135M's matrices, weights
streamed from memory as in a real step):
  * One row (a batch-1 decode step): F.linear is a single-threaded GEMV, ~11 GB/s of the host's ~31.
    Splitting the weight's rows into one slice per thread and multiplying the slices as a batch (bmm
    runs them in parallel) reads on every core: the 30 layers' projections 37.5 -> 21.5 ms, the
    vocabulary matrix 11.0 -> 6.1 ms. A compiled batch-1 step: 36 -> 25 ms.
  * 2-256 rows (batched decode, short prompt chunks): (w @ x.T).T is the same product, 1.2-3x faster than
    F.linear's x @ w.T: the layers 81 -> 47 ms at 16 rows, the vocabulary matrix 27 -> 16 ms. Not
    inside a compiled graph: inductor packs F.linear's weights for MKL, as fast there, and the
    transposed layout made the compiled steps slower.
"""
from __future__ import annotations

import torch

# The slices of a one-row product: the intra-op threads. A module value rather than a call to
# torch.get_num_threads() per product, which dynamo cannot trace (it would split the compiled graph).
_threads = torch.get_num_threads()

# Past this many rows the transposed form's gain is gone (512 rows: 24 vs 25 ms for a layer's four
# products) and its column-major result slows what follows: a 1,500-token prompt's 512-row chunks
# took 4.7 s instead of 3.5 s.
_MAX_TRANSPOSED_ROWS = 256


def use_threads(n: int) -> None:
    """After torch.set_num_threads(n): one-row products split into n slices."""
    global _threads
    _threads = n


def float32_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ w [N, K].T, or None where F.linear is the better choice."""
    if x.shape[0] == 1:
        if _threads < 2 or w.shape[0] % _threads:
            return None
        slices = w.view(_threads, w.shape[0] // _threads, w.shape[1])
        return torch.bmm(slices, x.t().expand(_threads, -1, 1)).view(1, w.shape[0])
    if x.shape[0] > _MAX_TRANSPOSED_ROWS or torch.compiler.is_compiling():
        return None
    return (w @ x.t()).t()
