"""The coordinator: the Flower ServerApp, aggregation strategy and adapter registry."""
