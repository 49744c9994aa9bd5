"""A site runs only the fedlora it installed: the run's FAB must be that code, byte for byte.

Flower's SuperNode hands each message to ``flwr-clientapp``, which unpacks the run's FAB (built
by whoever submitted the run) and imports the ClientApp from it: the submitter's code would run
as the site's user, next to its keys and data. ``fedlora site start`` therefore puts a folder
of its own first on the SuperNode's PATH (``write_task_shims``): its ``flwr-clientapp`` is
``fedlora.pinned_clientapp``, which checks the FAB against the installed packages before
anything from it is unpacked or imported, and then runs the *installed* ClientApp; the other
task commands Flower knows (``flwr-serverapp``, ``flwr-agentapp``, ...) refuse to start at a
site. A FAB differs from the installed app when a Python file differs, is missing or is extra,
or when it holds anything besides the Python packages and ``pyproject.toml``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import shlex
import sys
import zipfile
from pathlib import Path

from common.atomic import write_bytes_atomic
from common.errors import FedloraError

APP_PACKAGES = ("common", "client", "server", "fedlora")  # what a FAB of fedlora holds
FAB_METADATA = (".info/",)  # Flower's own content list and signatures inside the FAB
MAX_FAB_FILE = 16 * 1024 * 1024  # bytes, uncompressed, for one member (a zip bomb is refused)
MAX_FAB_TOTAL = 64 * 1024 * 1024  # bytes, uncompressed, for the whole FAB
# The task commands Flower's SuperExec starts by name (flwr.supercore.constant.TaskType).
CLIENT_APP_COMMAND = "flwr-clientapp"
REFUSED_COMMANDS = (
    "flwr-serverapp",
    "flwr-simulation",
    "flwr-agentapp",
    "flwr-model",
    "flwr-connector",
)
REFUSED_EXIT = 126  # "found but cannot execute": the shell's code for a refused command


class AppPinError(FedloraError):
    """The run's app is not the fedlora installed at this site."""


def installed_app_files() -> dict[str, str]:
    """SHA-256 (hex) of every ``.py`` file of the installed packages, keyed ``package/path``."""
    files: dict[str, str] = {}
    for package in APP_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise AppPinError(f"package {package!r} is not installed at this site")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            name = f"{package}/{path.relative_to(root).as_posix()}"
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def fab_app_files(fab: bytes) -> dict[str, str]:
    """SHA-256 (hex) of every app file in a FAB (a zip); ``pyproject.toml`` and ``.info/`` aside.

    Nothing is extracted: members are read into memory, each within ``MAX_FAB_FILE`` bytes
    and all within ``MAX_FAB_TOTAL``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise AppPinError("the run's FAB is not a zip archive") from None
    files: dict[str, str] = {}
    total = 0
    with archive:
        for member in archive.infolist():
            name = member.filename
            if member.is_dir() or name == "pyproject.toml" or name.startswith(FAB_METADATA):
                continue
            total += member.file_size
            if member.file_size > MAX_FAB_FILE or total > MAX_FAB_TOTAL:
                raise AppPinError(f"the run's FAB is too large (at member {name!r})")
            with archive.open(member) as handle:
                content = handle.read(MAX_FAB_FILE + 1)
            if len(content) > MAX_FAB_FILE:  # the header's size was a lie
                raise AppPinError(f"the run's FAB is too large (at member {name!r})")
            files[name] = hashlib.sha256(content).hexdigest()
    return files


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_fab(fab: bytes, installed: dict[str, str] | None = None) -> None:
    """Raise ``AppPinError`` unless the FAB's files are exactly the installed fedlora's."""
    expected = installed_app_files() if installed is None else installed
    actual = fab_app_files(fab)
    changed = sorted(
        name for name in actual.keys() & expected.keys() if actual[name] != expected[name]
    )
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    if not (changed or missing or extra):
        return
    parts = []
    if changed:
        parts.append(f"{len(changed)} file(s) differ ({_listed(changed)})")
    if extra:
        parts.append(f"{len(extra)} file(s) are not in it ({_listed(extra)})")
    if missing:
        parts.append(f"{len(missing)} of its file(s) are missing ({_listed(missing)})")
    raise AppPinError(
        "refused: the run's app is not the fedlora installed at this site: "
        + "; ".join(parts)
        + ". A site runs only its installed ClientApp; the coordinator and the sites must "
        "install the same fedlora"
    )


def write_task_shims(folder: Path) -> Path:
    """Write the site's task commands into ``folder`` (made 0700); put it first on PATH.

    ``flwr-clientapp`` runs ``fedlora.pinned_clientapp`` with this interpreter; every other
    task command exits with ``REFUSED_EXIT`` and a message.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    python = shlex.quote(sys.executable)
    scripts = {CLIENT_APP_COMMAND: f'exec {python} -m fedlora.pinned_clientapp "$@"\n'}
    for command in REFUSED_COMMANDS:
        scripts[command] = (
            f"echo 'fedlora site: {command} is not run at a site (only the installed "
            f"ClientApp is)' >&2\nexit {REFUSED_EXIT}\n"
        )
    for name, body in scripts.items():
        path = folder / name
        write_bytes_atomic(path, ("#!/bin/sh\n" + body).encode())
        path.chmod(0o700)  # written before the SuperNode that runs it starts
    return folder
