"""The HTTP front-ends over the engine, on KServe's FastAPI app: KServe V1/V2 (kserve_model), OpenAI (openai/),
Kaito (kaito/), FastChat's worker routes (worker) and embeddings, sharing one layer for prompts, errors,
readiness and cancellation. Nothing here touches torch: the engine does."""
