"""Keys in simulation (``fedlora simulate`` and ``flwr run .``): made in the run folder.

In a simulation one process stands in for every party, so it makes their keys: the
coordinator's envelope and instruction keys, one signing key per virtual site, and the
enrollment authority's key that signs the roster of site keys.
"""

from __future__ import annotations

from pathlib import Path

from common.allow_list import add_site, load_allow_list
from common.app_run_config import KEYS_FOLDER
from common.config import RunConfig
from common.instructions import INSTRUCTION_KEY_ID, INSTRUCTION_PUBLIC_NAME, instruction_key_path
from common.keys import (
    COORDINATOR_KEY_NAME,
    PRIVATE_SUFFIX,
    export_public,
    generate_coordinator_key,
    generate_site_key,
    load_coordinator_private,
    load_site_private,
    public_path_for,
)
from common.roster import ENROLL_KEY_ID, ENROLL_KEY_NAME, roster_bytes
from server.strategy import Sealing


def provision_keys(cfg: RunConfig, out_dir: Path) -> Sealing | None:
    """The coordinator's keys for a simulation in ``out_dir``; None in privacy mode ``none``.

    Missing keys are created under ``<out>/keys`` (private halves 0600) and every site is
    enrolled in the allow-list; existing ones (a resumed run, or ``privacy.coordinator-key``
    and ``privacy.allow-list`` from the config) are used as they are. The virtual sites read
    theirs from the same folder (``client.app.SiteKeys``).
    """
    if cfg.privacy.mode == "none":
        return None
    folder = out_dir / KEYS_FOLDER
    coordinator_key = cfg.privacy.coordinator_key or folder / COORDINATOR_KEY_NAME
    if not coordinator_key.exists():
        generate_coordinator_key(folder, kem=cfg.privacy.kem)
    if not public_path_for(folder / COORDINATOR_KEY_NAME).exists():
        export_public(coordinator_key, public_path_for(folder / COORDINATOR_KEY_NAME))
    allow_list = cfg.privacy.allow_list or folder / "allow-list.json"
    for index in range(cfg.federation.sites):
        site = f"site-{index}"
        if not (folder / f"{site}{PRIVATE_SUFFIX}").exists():
            key = generate_site_key(folder, site)
            if cfg.privacy.allow_list is None:
                add_site(allow_list, site, public_path_for(key))
    instruction = instruction_key_path(coordinator_key)
    if not instruction.exists():
        generate_site_key(instruction.parent, INSTRUCTION_KEY_ID)
    if not (folder / INSTRUCTION_PUBLIC_NAME).exists():  # what every site pins
        export_public(instruction, folder / INSTRUCTION_PUBLIC_NAME)
    # The enrollment authority (here, the simulation itself) signs the roster of site keys.
    enroll = folder / ENROLL_KEY_NAME
    if not enroll.exists():
        generate_site_key(folder, ENROLL_KEY_ID)
    enrolled = load_allow_list(allow_list)
    roster = roster_bytes(
        {site: enrolled.public_key(site) for site in enrolled}, load_site_private(enroll)
    )
    return Sealing(
        load_coordinator_private(coordinator_key),
        enrolled,
        load_site_private(instruction),
        roster,
    )
