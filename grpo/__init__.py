"""grpo: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), Hydra-configured."""
