"""Evaluation: rolling-window perplexity of plain text, scored as lm-evaluation-harness scores it."""
