"""What prefill and decode nodes share: config, model, weights, tokenizer, paged KV cache,
block pool and prefix cache, block hashing, sampler, model runner and the in-process Engine.

Importing this package imports nothing heavy: `block_hash`, `tokenizer`, `sampling_params`,
`request` and `config` are torch-free so that the router can use them without torch.
"""
