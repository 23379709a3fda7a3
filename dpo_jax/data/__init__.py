"""Preference data: records, tokenisation, batching and loading."""
