"""``flwr-clientapp`` at a fedlora site: Flower's ClientApp process, pinned to the installed app.

The site daemon's task shim (``fedlora.app_pin.write_task_shims``) runs this module with the
arguments Flower's SuperExec passes to ``flwr-clientapp``. It runs Flower's own process
(``flwr.supernode.cli.flwr_clientapp``: pull the message, run the app, push the reply, report
the task's status) with two of its steps replaced:

- *install the FAB* becomes *check the FAB* (``fedlora.app_pin.check_fab``): nothing of the
  FAB is unpacked; a FAB that is not the installed fedlora raises, and Flower's process sends
  the coordinator an error reply carrying the reason;
- *load the ClientApp from the FAB* becomes *import the installed* ``client.deploy_app.app``.

Installing a FAB's dependencies at run time would run its build code, so it is refused too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from fedlora.app_pin import AppPinError, check_fab

# The names ``flwr.supernode.runtime.run_clientapp`` looks up when it runs (Flower 1.42).
PATCHED = ("install_from_fab", "get_load_client_app_fn", "install_app_dependencies")


def _check_instead_of_install(fab_content: bytes, *_: Any, **__: Any) -> None:
    check_fab(fab_content)


def _installed_loader(*_: Any, **__: Any) -> Any:
    def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
        from client.deploy_app import app  # the installed package, never the FAB's

        return app

    return load


def _refuse_dependency_install(*_: Any, **__: Any) -> Any:
    raise AppPinError("refused: a site does not install a run's dependencies")


def pin(module: Any) -> None:
    """Replace the FAB steps of Flower's ClientApp process; refuse if they are not there."""
    missing = [name for name in PATCHED if not hasattr(module, name)]
    if missing:
        raise AppPinError(
            f"this Flower's ClientApp process has no {', '.join(missing)}: fedlora cannot pin "
            "the app, so the site runs nothing (install the flwr version fedlora requires)"
        )
    module.install_from_fab = _check_instead_of_install
    module.get_load_client_app_fn = _installed_loader
    module.install_app_dependencies = _refuse_dependency_install


def main() -> None:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    try:  # the module, not the function of the same name that its package exports
        pin(importlib.import_module("flwr.supernode.runtime.run_clientapp"))
    except AppPinError as exc:
        print(f"fedlora site: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    flwr_clientapp()


if __name__ == "__main__":
    main()
