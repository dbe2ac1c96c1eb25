"""The qcow2 format driver: on-disk format, mapping, refcounts, cache, check."""
