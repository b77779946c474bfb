"""Istio sidecar mode: HTTP policy for the pod's own Envoy over ECDS.

`workload` is the pure core (node ids, SPIFFE principals, RBAC configs);
`publisher` puts them on the agent's xDS server.
"""
