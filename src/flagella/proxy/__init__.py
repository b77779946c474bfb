"""The L7 proxy side of Flagella: the node-local Envoy (its bootstrap and supervision, the
listeners, ports and RBAC policy it is given) and the Kafka policy processor."""
