"""Decoder-only transformers (Flax NNX) and their weight converters."""
