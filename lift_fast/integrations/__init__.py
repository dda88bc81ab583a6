"""lift-fast runs as models of other tools: CLIP_benchmark (lift_fast.integrations.clip_benchmark)."""
