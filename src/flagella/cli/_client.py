"""The CLI's agent client: `flagella.client`, which the CNI plugin shares."""

from flagella.client import DEFAULT_SOCKET, call, socket_path, stream

__all__ = ["DEFAULT_SOCKET", "call", "socket_path", "stream"]
