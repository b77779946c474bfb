"""The composition root: settings in, a running agent out."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run(config: str | Path | None, **overrides: Any) -> None:
    from flagella.agent._logs import configure_logging
    from flagella.agent.core import AgentCore
    from flagella.agent.server import run_agent
    from flagella.agent.settings import load_settings
    from flagella.datapath.kernel import KernelDatapath

    settings = load_settings(config, **overrides)
    configure_logging()
    datapath = KernelDatapath(settings)
    run_agent(AgentCore(settings, datapath))
