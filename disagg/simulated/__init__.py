"""Simulated nodes: the real coordinator and node protocol at cluster scale on one
machine. Each node's model step sleeps the latency profile's time for that batch; KV
pools and capacities are the profile's; tokens are deterministic; KV moves by message
after the profile's transfer time. Many nodes share one process (``python -m
disagg.simulated``), separate from the coordinator's; ``disagg serve --simulated``
starts it."""
