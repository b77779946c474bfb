"""Kafka policy enforcement, sans-IO (see `_processor` for the theory of operation)."""
