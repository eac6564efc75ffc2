"""End-to-end benchmarks through vLLM's engine (issue 5): configurations, dummy-weight model folders, drivers."""
