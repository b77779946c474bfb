"""The node-local Envoy: its bootstrap and supervision, the listeners and RBAC
policy it is given, and (in ``flagella.proxy.kafka``) the Kafka processor behind
its network ext_proc filter."""
