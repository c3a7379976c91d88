"""`llm-predictor bench`: the server over HTTP against the raw batched decode loop and one-at-a-time generate."""
