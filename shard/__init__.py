import os

# PyTorch's CPU matmuls in bf16 go through ideep/oneDNN, which keep one compiled kernel (with its
# buffers) per distinct matmul shape: up to 1,024 in ideep's cache (LRU_CACHE_CAPACITY) and 1,024 in
# oneDNN's (ONEDNN_PRIMITIVE_CACHE_CAPACITY). Attention's shapes change at every decode step (the
# context grows by one, the batch comes and goes), so under varied load those caches grew the shard
# by hundreds of MB: 1,500 shapes cost 816 MB at the defaults, 86 MB at 64 (bench/RESULTS.md).
# 64 still holds every shape that one step reuses across its layers. Both are read on first use.
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
