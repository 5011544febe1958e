"""Scheduling policies: pure Python, no I/O, shared by every scheduler in the system."""

from disagg.scheduling.policy import FCFS, SchedulingPolicy, make_policy

__all__ = ["FCFS", "SchedulingPolicy", "make_policy"]
