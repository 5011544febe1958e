"""Discrete-event cluster simulator: workloads, cluster model, latency model, metrics."""
