"""Local endpoints: their record, lifecycle and persistence."""

from flagella.endpoint.lifecycle import IllegalTransition, State, transition
from flagella.endpoint.model import Endpoint
from flagella.endpoint.store import EndpointStore

__all__ = ["Endpoint", "EndpointStore", "IllegalTransition", "State", "transition"]
