"""The settings tables (router/config.py, shard/settings.py) are the one place a setting is declared:
the CLI's flags, their environment defaults, the argv `sluice serve` gives its shard, and the README's
flag table all follow them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import RouterSettings
from shard.settings import ShardSettings
from sluice.cli import build_parser
from sluice.options import SHARD, from_args, options, to_argv

ROOT = Path(__file__).resolve().parents[2]


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def test_every_flag_has_both_spellings():
    for command in ("serve", "router", "shard"):
        flags = flags_of(command)
        for flag in (f for f in flags if f.startswith("--") and "-" in f[2:]):
            assert "--" + flag[2:].replace("-", "_") in flags, (command, flag)


def test_the_launcher_argv_gives_the_shard_the_same_settings():
    args = build_parser().parse_args(["serve", "--dtype", "float32", "--max_batch_size", "7", "--compile",
                                      "--shutdown-timeout", "3", "--model-id", "/m", "--num-threads", "1"])
    wanted = from_args(ShardSettings, args, address="unix:///tmp/x.sock")
    shard_args = build_parser().parse_args(["shard", *to_argv(wanted, SHARD)])
    assert from_args(ShardSettings, shard_args) == wanted
    assert wanted.max_batch_size == 7 and wanted.compile and wanted.shutdown_timeout_s == 3.0


def test_environment_sets_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "9")
    monkeypatch.setenv("DTYPE", "float32")
    monkeypatch.setenv("MODEL_ID", "")  # compose writes empty variables: unset
    args = build_parser().parse_args(["serve", "--max-concurrent-requests", "3"])
    router, shard = from_args(RouterSettings, args), from_args(ShardSettings, args)
    assert router.max_concurrent_requests == 3 and shard.dtype == "float32" and router.model_id is None
    assert from_args(RouterSettings, build_parser().parse_args(["router"])).max_concurrent_requests == 9


def test_flags_exist_only_where_they_mean_something():
    assert "--allow-remote" in flags_of("shard") and "--allow-remote" not in flags_of("serve")
    assert "--shard-address" in flags_of("router") and "--shard-address" not in flags_of("serve")
    assert {"--max-batch-size", "--max-concurrent-requests"} <= flags_of("serve")


@pytest.fixture(scope="module")
def readme_flags() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("\n## Flags"):].split("\n## ", 2)[1]


def test_readme_flag_table_lists_every_flag_and_no_other(readme_flags):
    table = {f for line in readme_flags.splitlines() if line.startswith("| `--")
             for f in re.findall(r"`(--[a-z-]+)`", line.split("|")[1])}
    declared = {opt.flag for cls in (RouterSettings, ShardSettings) for _, opt in options(cls)}
    cli = flags_of("serve") | flags_of("router") | flags_of("shard")
    assert declared <= table, f"flags missing from the README's table: {declared - table}"
    assert table <= cli, f"the README's table names flags the CLI lacks: {table - cli}"


def test_readme_flag_table_names_every_environment_variable(readme_flags):
    for cls in (RouterSettings, ShardSettings):
        for _, opt in options(cls):
            if opt.env:
                row = next(line for line in readme_flags.splitlines()
                           if line.startswith("| `--") and f"`{opt.flag}`" in line.split("|")[1])
                assert opt.env in row, f"README: the {opt.flag} row should name {opt.env}"
