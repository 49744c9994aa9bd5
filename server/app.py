"""The Flower ``ServerApp``: glue that runs ``server.federation.run_federation`` on a Grid."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Coordinator, run_federation


def make_server_app(coord: Coordinator, resume: bool = False) -> ServerApp:
    """A ServerApp for a prepared coordinator (base model loaded, data checked)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, coord, resume=resume)

    return app
