"""Sluice: a streaming LLM inference server (router + tensor-parallel shards over gRPC)."""

__version__ = "0.1.0"
