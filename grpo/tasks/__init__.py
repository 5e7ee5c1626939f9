"""Tasks: one module per data set (rows, prompt, stop rule, answer checks), the rewards,
and the GSM8K answer extractor."""
