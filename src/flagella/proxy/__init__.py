"""The L7 proxy side of Flagella: the node-local Envoy and the Kafka policy processor."""
