"""The GRPO math on plain tensors (policy losses, advantage estimators, KL estimators, the
loss) and the update that applies it: registries in `policy_losses`, `advantages`, `kl`."""
