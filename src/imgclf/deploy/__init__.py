"""Deployment: export with preprocessing in the graph, runtimes, the batching server and drift monitoring."""
