"""The ``moecpt`` dispatcher: every area's commands are registered, and a broken area is never hidden."""

import pytest

import moecpt.cli as cli


def test_every_area_registers_its_commands():
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    for command in ("pretrain", "cpt", "plan", "data", "schedule", "lopt", "import-hf"):
        assert command in choices


def test_a_missing_area_module_is_an_error_not_a_skipped_command(monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("moecpt.no_such_area.cli",))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()
