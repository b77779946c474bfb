"""The API limits (settings group ``api``): the derived connection cap and validation."""

from __future__ import annotations

import pytest

from flagella.agent.settings import (
    MAX_DERIVED_CONNECTIONS,
    RESERVED_FDS,
    ApiSettings,
    connection_cap,
    load_settings,
)
from flagella.errors import InputError


@pytest.mark.parametrize("nofile", [64, 300, 1024, 4096, 20000, 1 << 20])
def test_derived_cap_leaves_fds_for_the_agent(nofile: int) -> None:
    cap = connection_cap(ApiSettings(), nofile)
    assert 1 <= cap <= MAX_DERIVED_CONNECTIONS
    if nofile > 2 * RESERVED_FDS:
        # Below the fd limit by the reserve (and by a quarter of the limit).
        assert cap <= nofile - max(RESERVED_FDS, nofile // 4)
        assert cap == min(MAX_DERIVED_CONNECTIONS, nofile - max(RESERVED_FDS, nofile // 4))


@pytest.mark.parametrize(("asked", "nofile"), [(10, 20000), (5000, 20000), (50_000, 20000), (900, 1024)])
def test_explicit_cap_never_exceeds_the_fd_budget(asked: int, nofile: int) -> None:
    cap = connection_cap(ApiSettings(max_connections=asked), nofile)
    budget = nofile - max(RESERVED_FDS, nofile // 4)
    assert cap == min(asked, budget)


def test_settings_file_sets_the_limits(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("api: {max_request_bytes: 2048, idle_timeout_s: 1.5, max_connections: 7, trace_timeout_s: 3}\n")
    api = load_settings(path).api
    assert (api.max_request_bytes, api.idle_timeout_s, api.max_connections, api.trace_timeout_s) == (2048, 1.5, 7, 3.0)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("api: {max_request_bytes: 10}", "api.max_request_bytes"),
        ("api: {idle_timeout_s: 0}", "api.idle_timeout_s"),
        ("api: {trace_timeout_s: .inf}", "api.trace_timeout_s"),
        ("api: {max_connections: -1}", "api.max_connections"),
        ("api: {max_conections: 5}", "api.max_conections"),
    ],
)
def test_bad_limits_name_the_field(tmp_path, text: str, field: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        load_settings(path)
