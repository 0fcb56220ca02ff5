"""The prefill node: batches prompts, reuses its prefix cache, pushes KV to decode nodes."""
