"""Experiments built on the library's public functions (`frontier`: reward vs KL)."""
