"""Site-level DP clipping, observed on what a site really seals (no Flower runtime, tiny model).

The accountant counts each site's contribution as at most ``C`` in L2 norm. These tests train a
real site, seal its reply the way the ClientApp does (``client.app._wire_payloads``), open the
envelopes with the coordinator's key and measure the delta that arrives: its norm is at most
``C``, although the same training without clipping moves the adapters by several times ``C``.
A site that skipped clipping fails them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from client.app import SiteKeys, _wire_payloads
from client.site import SiteRuntime
from client.site_api import SiteUpdate
from common import protocol as P
from common.adapter_host import AdapterHost
from common.adapters import delta_norm
from common.config import RunConfig, SitePlan, load_config, site_plan
from common.data import load_dataset
from common.encoding import decode_delta
from common.envelope import EnvelopeContext, open_delta
from common.modules import join_modules, split_modules
from common.partition import site_data
from fedlora.simulate import provision_keys
from server.strategy import Sealing

# Relative error of one rounding to the format, per element and so for the L2 norm: float32's
# and float16's unit roundoff (IEEE 754), not a bound the code under test reports.
ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11}
MAX_BYTES = 1 << 24  # 16 MiB: far above the tiny model's adapters


def _runtime(cfg: RunConfig) -> SiteRuntime:
    dataset = load_dataset(cfg.data)
    host = AdapterHost(cfg.model, cfg.modules, None)
    data = site_data(dataset, 0, cfg.federation.sites, cfg.data)
    return SiteRuntime(host, data, dataset.kind, "site-0", 0)


def _header() -> ConfigRecord:
    return ConfigRecord({P.KEY_RUN_ID: "run", P.KEY_ROUND: 1, P.KEY_VERSION: 0})


def _sealed_norm(
    update: SiteUpdate, plan: SitePlan, site: SiteRuntime, keys: SiteKeys, sealing: Sealing
) -> tuple[float, float]:
    """Seal ``update`` as the site's app does, open it as the coordinator; the delta's norm
    (over every sent module) and the clip scale in the sealed report."""
    record = _wire_payloads(update, plan, _header(), site, keys)

    def open_as_coordinator(key: str, module: str) -> bytes:
        context = EnvelopeContext(
            run_id="run",
            round=1,
            site_id=site.site_id,
            module=module,
            version=0,
            base_fingerprint=site.fingerprint,
        )
        envelope = bytes(record[key])  # type: ignore[arg-type]
        return open_delta(envelope, sealing.coordinator, sealing.allow_list, context, MAX_BYTES)

    opened: dict[str, dict[str, torch.Tensor]] = {
        module: decode_delta(open_as_coordinator(P.delta_key(module), module), MAX_BYTES)
        for module in sorted(split_modules(update.delta))
    }
    report = open_as_coordinator(P.KEY_REPORT, P.REPORT_MODULE)
    return delta_norm(join_modules(opened)), float(P.parse_report(report)[P.METRIC_CLIP_SCALE])


@pytest.mark.parametrize("encoding", ["fp32", "fp16"])
def test_the_delta_a_site_seals_has_norm_at_most_c(
    examples_dir: Path, tmp_path: Path, encoding: str
) -> None:
    cfg = load_config(examples_dir / "tiny.toml", [f"privacy.encoding='{encoding}'"])
    sealing, keys = provision_keys(cfg, tmp_path)
    assert sealing is not None and keys is not None
    site = _runtime(cfg)
    received = join_modules(site.host.initial)
    plain = site_plan(cfg)
    assert plain.clip is None
    unclipped = delta_norm(site.train(received, plain, server_round=1, version=0).delta)
    clip = unclipped / 4  # clipping must bite: the same training moves the adapters by 4 C
    dp_plan = site_plan(
        load_config(
            examples_dir / "tiny.toml",
            [
                f"privacy.encoding='{encoding}'",
                "privacy.dp.enabled=true",
                f"privacy.dp.clip={clip!r}",
            ],
        )
    )
    assert dp_plan.clip == clip

    update = site.train(received, dp_plan, server_round=1, version=0)
    norm, scale = _sealed_norm(update, dp_plan, site, keys, sealing)

    assert norm <= clip * (1 + ROUNDOFF[encoding]), (norm, clip)
    # Clipping scales, it does not zero: the sealed delta is C long; the report says by how much.
    assert norm == pytest.approx(clip, rel=4 * ROUNDOFF[encoding] + 1e-6)
    assert scale == pytest.approx(0.25, rel=1e-5)


def test_a_delta_already_within_c_is_sealed_unchanged(examples_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        examples_dir / "tiny.toml", ["privacy.dp.enabled=true", "privacy.dp.clip=1e6"]
    )
    sealing, keys = provision_keys(cfg, tmp_path)
    assert sealing is not None and keys is not None
    site = _runtime(cfg)
    update = site.train(join_modules(site.host.initial), site_plan(cfg), 1, 0)
    norm, scale = _sealed_norm(update, site_plan(cfg), site, keys, sealing)
    assert scale == 1.0 and math.isclose(norm, delta_norm(update.delta), rel_tol=1e-6)
