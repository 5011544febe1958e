"""Tensor and pipeline parallelism for the engine (docs/parallel.md).

``layout`` says which part of the model each rank holds; ``layers`` and ``loading``
apply that to a :class:`CausalLM` from outside and fill it shard by shard; ``plan``
holds the leader <-> rank messages; ``rank`` is a rank (worker and process);
``group`` starts and watches a group of ranks; ``leader`` is the group's leader as
the engine's worker.
"""
