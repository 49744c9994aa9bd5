"""Argument types shared by the ``fedlora`` subcommands: a bad value is a usage error (rc 2,
the subcommand's usage and one line) before any work starts, not a traceback later."""

from __future__ import annotations

import argparse
from pathlib import Path


def output_folder(text: str) -> Path:
    """A folder to write into: absent (it is created) or a folder, never an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path
