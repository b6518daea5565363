"""Every command and every option explains itself in --help."""

from __future__ import annotations

import pytest

from mopeq.cli import COMMANDS, _parser, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command):
    sub = next(a for a in _parser()._actions if a.dest == "command").choices[command]
    assert sub.description, f"mopeq {command} has no description"
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"mopeq {command}: {action.option_strings or action.dest} has no help text"
