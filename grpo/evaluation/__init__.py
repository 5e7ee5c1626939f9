"""Held-out evaluation (greedy accuracy, pass@k, maj@k) and the original-vs-trained model
comparison."""
