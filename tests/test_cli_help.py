"""The `fedlora` command's parser: fast to build, plain help texts, options where users put them.

Nothing here loads a model: these tests parse and print help only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora.cli import LOGGERS, _parser, configure_logging, main

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "peft", "transformers", "datasets", "matplotlib")


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("fedlora",)
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser``, with its command line (``fedlora keys init``)."""
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


def test_help_does_not_import_torch() -> None:
    """`fedlora --help` and every `fedlora X --help` build the parsers of every command."""
    code = (
        "import json, sys\n"
        "from fedlora.cli import _parser\n"
        "_parser().format_help()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_every_help_text_is_complete_plain_text() -> None:
    names = []
    for name, parser in subcommands(_parser()):
        names.append(name)
        text = parser.format_help()
        assert parser.description, f"`{name} --help` has no description"
        assert "``" not in text, f"`{name} --help` shows RST literals:\n{text}"
        assert "::" not in text, f"`{name} --help` shows an RST block marker:\n{text}"
    assert {"fedlora keys init", "fedlora coordinator run", "fedlora site start"} <= set(names)


def test_keys_init_help_shows_what_it_writes() -> None:
    parsers = dict(subcommands(_parser()))
    text = parsers["fedlora keys init"].format_help()
    assert "DIR/sites/<site>/" in text and "supernode.key" in text


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedlora {importlib.metadata.version('fedlora')}"


@pytest.mark.parametrize(
    ("argv", "level", "log_file"),
    [
        (["simulate", "c.toml", "--out", "o"], logging.INFO, None),
        (["-v", "simulate", "c.toml", "--out", "o"], logging.DEBUG, None),
        (["simulate", "c.toml", "--out", "o", "-v"], logging.DEBUG, None),
        (["simulate", "c.toml", "-q", "--out", "o"], logging.WARNING, None),
        (["registry", "list", "run", "--quiet"], logging.WARNING, None),
        (["--log-file", "a.log", "demo"], logging.INFO, Path("a.log")),
        (
            ["keys", "init", "--out", "k", "--sites", "a", "--log-file", "b.log"],
            logging.INFO,
            Path("b.log"),
        ),
    ],
)
def test_logging_options_before_or_after_the_subcommand(
    argv: list[str], level: int, log_file: Path | None
) -> None:
    args = _parser().parse_args(argv)
    assert (args.log_level, args.log_file) == (level, log_file)


def test_log_file_gets_debug_records_the_terminal_does_not(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    try:
        configure_logging(logging.WARNING, log_file)
        configure_logging(logging.WARNING, log_file)  # a second main() in the same process
        logging.getLogger("fedlora.test").debug("round %d done", 3)
        terminal = [
            h for h in logging.getLogger("fedlora").handlers if type(h) is logging.StreamHandler
        ]
    finally:
        configure_logging(logging.INFO)
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].endswith("DEBUG fedlora.test: round 3 done")
    assert [h.level for h in terminal] == [logging.WARNING]
    assert all(logging.getLogger(name).level == logging.INFO for name in LOGGERS)


def test_unwritable_log_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "no-such-folder" / "x.log"
    code = main(["registry", "list", str(tmp_path), "--log-file", str(log_file)])
    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith("error: --log-file:") and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["simulate", "c.toml", "--out", "o", "--bogus"], "usage: fedlora simulate"),
        (["registry", "list", "run", "--bogus"], "usage: fedlora registry list"),
        (["demo", "--rezume"], "usage: fedlora demo"),
    ],
)
def test_unknown_argument_shows_the_subcommand_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert f"error: unrecognized arguments: {argv[-1]}" in err
