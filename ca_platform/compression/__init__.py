"""Compression: the global cut of every subset variant and each shard's re-packed subset."""

# The share of the scored pool every subset keeps unless told otherwise (the paper goes down to about 0.12):
# the resource default, the CA_KEEP_FRACTION default and the CLI's default all read this one.
DEFAULT_KEEP_FRACTION = 0.3
