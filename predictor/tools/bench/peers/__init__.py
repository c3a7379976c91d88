"""`llm-predictor bench-peers`: our server against vLLM's CPU build, same model, same client, one run."""
