"""One reader of environment settings for the operator and the sidecar: same rules, same messages."""

from __future__ import annotations

import pytest

from esper.envconfig import ConfigError
from esper.sidecar.config import SyncConfig
from esper_operator.config import OperatorConfig

STORE = {"ESPER_STORE_URI": "s3://bucket/x"}


def _error(read, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        read(env)
    return str(err.value).splitlines()


def test_both_processes_list_every_bad_variable_the_same_way() -> None:
    operator = _error(
        OperatorConfig.from_env, {**STORE, "ESPER_TOLERATIONS": "[oops", "ESPER_BACKOFF_LIMIT": "-1"}
    )
    assert operator[0] == "invalid operator configuration:"
    assert operator[1:] == [
        "  ESPER_TOLERATIONS: not valid JSON (Expecting value)",
        "  ESPER_BACKOFF_LIMIT: Input should be greater than or equal to 0",
    ]
    sidecar = _error(
        SyncConfig.from_env, {"ESPER_KERNEL_DIR": "/k", "ESPER_KERNELS": "a", "ESPER_SYNC_WORKERS": "99"}
    )
    assert sidecar == [
        "invalid sidecar configuration:",
        "  ESPER_SYNC_WORKERS: Input should be less than or equal to 32",
    ]


def test_a_missing_required_variable_says_what_it_is_for() -> None:
    assert _error(OperatorConfig.from_env, {})[1].startswith(
        "  ESPER_STORE_URI: required (Where compile Jobs"
    )
    assert _error(SyncConfig.from_env, {"ESPER_KERNELS": "a"})[1] == (
        "  ESPER_KERNEL_DIR: required (the shared kernel volume's mount path)"
    )


def test_blank_is_unset_in_both() -> None:
    assert OperatorConfig.from_env({**STORE, "ESPER_BACKOFF_LIMIT": " "}).backoff_limit == 3
    cfg = SyncConfig.from_env({"ESPER_KERNEL_DIR": "/k", "ESPER_KERNELS": "a", "ESPER_SYNC_PORT": ""})
    assert cfg.port == 9090


def test_resync_seconds_is_part_of_the_operator_config() -> None:
    assert OperatorConfig.from_env({**STORE, "ESPER_RESYNC_SECONDS": "3"}).resync_seconds == 3.0
    assert OperatorConfig.setting_from_env("resync_seconds", {"ESPER_RESYNC_SECONDS": "3"}) == 3.0
    assert OperatorConfig.setting_from_env("resync_seconds", {}) == 300.0
    for bad, message in (("0", "greater than 0"), ("soon", "valid number")):
        with pytest.raises(ConfigError, match=f"ESPER_RESYNC_SECONDS: Input should be (a )?{message}"):
            OperatorConfig.setting_from_env("resync_seconds", {"ESPER_RESYNC_SECONDS": bad})
    with pytest.raises(ConfigError, match="ESPER_RESYNC_SECONDS: Input should be greater than 0"):
        OperatorConfig.from_env({**STORE, "ESPER_RESYNC_SECONDS": "-5"})
