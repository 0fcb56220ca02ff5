"""Moving a prompt's KV blocks from a prefill node into a decode node's reserved blocks."""
