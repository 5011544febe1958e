"""The placement planner: `disagg plan` (docs/planner.md)."""
