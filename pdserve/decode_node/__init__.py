"""The decode node: receives prompt KV into reserved blocks and decodes with continuous batching."""
