"""The operator side: Flower ServerApp, aggregation, checkpoints and `fedanom server`."""
