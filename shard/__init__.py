import os

# PyTorch's CPU bf16 matmuls go through oneDNN, which caches one compiled primitive (with its scratch
# buffers) per distinct matmul shape, up to 1,024 of them. Attention's shapes change at every decode
# step (the context grows by one), so under varied load that cache alone grew the shard by hundreds
# of MB. 64 still holds every shape one step reuses across its layers. Read when oneDNN first runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
