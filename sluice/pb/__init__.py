"""Generated from proto/sluice/shard.proto by `python scripts/gen_proto.py`: never edit by hand.

Only two modules import these types: the router's replica pool and the shard's servicer.
"""
