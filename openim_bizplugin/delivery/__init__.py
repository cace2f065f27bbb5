"""Delivery: the engine that leases work, sends it, applies offline policy and rate limits."""
