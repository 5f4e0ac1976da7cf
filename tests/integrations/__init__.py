"""Tests of `pear_data.integrations`: the shared settings (default run) and the framework adapters (opt-in)."""
