"""`llm-predictor soak`: N clients for T seconds against a local or given server, sending a mix of every route,
streamed and not, abandoning some requests midway and sending bad input, then checking the server settled."""
