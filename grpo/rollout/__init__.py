"""Rollouts: the grouped prompt sampler, generation (the lean decoder, transformers, vLLM),
and the log-probs of generated tokens under a model."""
