"""Model serving core: the registry directory, framework runners and micro-batching."""
