"""Build and deploy tools: the weight manifest, the model catalog, GPU sizing, the demo model and the benchmark.

The server imports none of these on its request path; start-up uses the manifest check and the demo model.
"""
