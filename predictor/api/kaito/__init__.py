"""Kaito-compatible routes (Kaito's llama-2, llama-2-chat and falcon preset servers)."""
