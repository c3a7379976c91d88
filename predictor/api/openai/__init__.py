"""OpenAI-compatible completions, chat completions, models and the Responses API: request bodies, routes, responses."""
