"""Version-guarded patches that let megatron-core's layers run on CPU with gloo.

Nothing here is applied on import: callers apply patches explicitly and idempotently.
"""
