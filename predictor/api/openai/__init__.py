"""OpenAI-compatible completions, chat completions, models: request bodies, routes, responses."""
