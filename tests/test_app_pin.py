"""A site runs only its installed fedlora: the FAB check, the task shims, the pinned process."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.cli.build import build_fab_from_disk

from fedlora.app_pin import (
    CLIENT_APP_COMMAND,
    REFUSED_COMMANDS,
    REFUSED_EXIT,
    AppPinError,
    check_fab,
    fab_app_files,
    installed_app_files,
    write_task_shims,
)
from fedlora.deploy import stage_app
from fedlora.pinned_clientapp import PATCHED, pin


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app exactly as ``fedlora coordinator run`` stages it."""
    return stage_app(tmp_path_factory.mktemp("app"))


def _fab(app: Path) -> bytes:
    return build_fab_from_disk(app)


def test_the_coordinators_fab_is_the_installed_app(staged: Path) -> None:
    fab = _fab(staged)
    assert fab_app_files(fab) == installed_app_files()
    check_fab(fab)  # no error
    assert "client/deploy_app.py" in installed_app_files()


def test_one_changed_byte_is_refused_naming_the_file(staged: Path, tmp_path: Path) -> None:
    app = stage_app(tmp_path)
    target = app / "client/train.py"
    target.write_bytes(target.read_bytes() + b"\n")
    with pytest.raises(AppPinError, match=r"1 file\(s\) differ \(client/train.py\)"):
        check_fab(_fab(app))


def test_an_extra_or_missing_file_is_refused(tmp_path: Path) -> None:
    extra = stage_app(tmp_path / "extra")
    (extra / "client/evil.py").write_text("import os\n")
    with pytest.raises(AppPinError, match=r"are not in it \(client/evil.py\)"):
        check_fab(_fab(extra))
    missing = stage_app(tmp_path / "missing")
    (missing / "common/dp.py").unlink()
    with pytest.raises(AppPinError, match=r"are missing \(common/dp.py\)"):
        check_fab(_fab(missing))


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_a_foreign_app_and_a_non_zip_are_refused() -> None:
    installed = {"client/deploy_app.py": "0" * 64}
    foreign = _zip({"pyproject.toml": b"", "evil/client.py": b"x = 1\n", ".info/CONTENT": b""})
    with pytest.raises(AppPinError, match=r"evil/client.py.*are missing \(client/deploy_app"):
        check_fab(foreign, installed)
    with pytest.raises(AppPinError, match="not a zip"):
        check_fab(b"PK\x03\x04 not really", installed)


def test_an_oversized_member_is_refused_before_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedlora.app_pin.MAX_FAB_FILE", 10)
    with pytest.raises(AppPinError, match=r"too large .*big\.py"):
        fab_app_files(_zip({"client/big.py": b"#" * 11}))
    assert fab_app_files(_zip({"client/ok.py": b"#" * 10})).keys() == {"client/ok.py"}


def test_the_shims_run_the_pinned_clientapp_and_refuse_every_other_task(tmp_path: Path) -> None:
    folder = write_task_shims(tmp_path / "shims")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert "-m fedlora.pinned_clientapp" in (folder / CLIENT_APP_COMMAND).read_text()
    env = dict(os.environ, PATH=os.pathsep.join([str(folder), os.environ["PATH"]]))
    for command in REFUSED_COMMANDS:  # resolved by name, as Flower's SuperExec does
        done = subprocess.run([command, "--token", "x"], env=env, capture_output=True, text=True)
        assert done.returncode == REFUSED_EXIT, command
        assert "not run at a site" in done.stderr


def test_pin_replaces_the_fab_steps_and_refuses_an_unknown_flower() -> None:
    module = SimpleNamespace(**{name: None for name in PATCHED})
    pin(module)
    with pytest.raises(AppPinError, match="not the fedlora installed"):
        module.install_from_fab(_zip({"evil/x.py": b""}))
    load = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    from client.deploy_app import app

    assert load("fedlora/fedlora", "1.0.0", "hash") is app
    with pytest.raises(AppPinError, match="does not install"):
        module.install_app_dependencies("/app", launch_id="t")
    with pytest.raises(AppPinError, match="install_from_fab"):
        pin(SimpleNamespace(get_load_client_app_fn=None, install_app_dependencies=None))


def test_the_installed_flower_has_every_step_that_is_pinned() -> None:
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    assert all(callable(getattr(module, name)) for name in PATCHED)
