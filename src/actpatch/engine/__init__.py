"""The task-neutral engine: sites, hooks, pairs and token batches with named positions, capture, prefix reuse,
planning, patching, attribution, path patching, checkpoints, sharding, metrics and the sanity checks.

It works on token ids, masks, per-row named positions and metric functions, and imports no task (a test checks it).
"""
