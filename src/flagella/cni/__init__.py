"""``flagella-cni``: the CNI plugin (spec 1.0.0, plus GC and STATUS of 1.1.0).

The plugin is a thin client: it checks the invocation (`flagella.cni._spec`, no I/O) and
asks the agent over its unix socket to do the work (`flagella.agent.cni`). It imports
only the standard library and `flagella.client`, `flagella.rpc`, `flagella.errors`, so it
runs from a zipapp on a node's own Python 3.11+.
"""

from flagella.cni._plugin import main, run
from flagella.cni._spec import SUPPORTED_VERSIONS, CniError, parse_config, parse_invocation

__all__ = ["SUPPORTED_VERSIONS", "CniError", "main", "parse_config", "parse_invocation", "run"]
