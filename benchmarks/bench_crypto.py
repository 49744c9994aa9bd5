"""What privacy costs per site and at the coordinator: sealed envelopes and secure sums.

Delta sizes are fp32 deltas of 7,680 / 115,200 / 460,800 / 1,843,200 coordinates (30 KB,
460 KB, 1.84 MB and 7.4 MB; 460,800 is SmolLM2-135M r=8 on q,v).

- **sealed** (``common.envelope``): ``seal_delta`` at the site (HPKE to the coordinator key,
  Ed25519 signature) and ``open_delta`` at the coordinator (bounds, signature, context, HPKE
  open), for both KEMs; the coordinator opens N envelopes per round. Median of ``--repeats``.
- **secure sum** (``common.secagg*``, Bonawitz et al. with a full peer graph, no dropouts):
  one round of N sites run in this process, every stage timed on its own: a site's total is
  advertise + share keys + masked input + confirm + unmask, the coordinator's is its five
  stages. Bytes up per site are the masked input (4 (L + 1)) plus the sealed shares, the
  advert and the confirmation signature.

    python benchmarks/bench_crypto.py [--sites 5 10] [--repeats 5] [--large]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from bench_output import Clock, header, print_table, write_result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.allow_list import AllowList
from common.envelope import EnvelopeContext, max_envelope_bytes, open_delta, seal_delta
from common.keys import CoordinatorPrivateKey
from common.secagg import CIPHERTEXT_BYTES, KEY_BYTES, SIGNATURE_BYTES, params_for
from common.secagg_client import SecAggSite
from common.secagg_server import SecAggServer

COORDINATES = (7_680, 115_200, 460_800, 1_843_200)
LARGE_COORDINATES = (7_372_800,)  # 29.5 MB in fp32
NORM_BOUND, MAX_WEIGHT = 1.0, 1000.0
ROUND_CONTEXT = b"fedlora/1|run-bench|round-1|module-shared|version-0"


def _median_seconds(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of ``repeats`` calls."""
    clocks = []
    for _ in range(repeats):
        clock = Clock()
        with clock.running():
            call()
        clocks.append(clock)
    return statistics.median(c.wall for c in clocks), statistics.median(c.cpu for c in clocks)


def sealed_costs(coordinates: int, sites: int, repeats: int) -> list[dict[str, Any]]:
    """Seal (per site) and open (per envelope, and N of them) for both KEMs."""
    payload = os.urandom(4 * coordinates)
    site_key = Ed25519PrivateKey.generate()
    allow = AllowList({"site-0": site_key.public_key()})
    context = EnvelopeContext(run_id="bench", round=1, site_id="site-0", module="shared",
                              version=0, base_fingerprint="0" * 64)  # fmt: skip
    rows = []
    for kem, pq in (("x25519", None), ("mlkem768-x25519", MLKEM768PrivateKey.generate())):
        coordinator = CoordinatorPrivateKey(X25519PrivateKey.generate(), pq)
        public = coordinator.public_key()
        envelope = seal_delta(payload, public, site_key, context)
        bound = max_envelope_bytes(len(payload))
        seal, seal_cpu = _median_seconds(
            partial(seal_delta, payload, public, site_key, context), repeats
        )
        opened, open_cpu = _median_seconds(
            partial(open_delta, envelope, coordinator, allow, context, bound), repeats
        )
        rows.append({"kem": kem, "coordinates": coordinates, "payload_bytes": len(payload),
                     "envelope_bytes": len(envelope), "seal_s": seal, "seal_cpu_s": seal_cpu,
                     "open_s": opened, "open_cpu_s": open_cpu, "sites": sites,
                     "server_open_all_s": sites * opened})  # fmt: skip
    return rows


def _timed(costs: dict[str, Clock], key: str, call: Callable[[], Any]) -> Any:
    """Run ``call``, adding its wall and CPU seconds to ``costs[key]``."""
    with costs.setdefault(key, Clock()).running():
        return call()


def secure_sum_round(coordinates: int, sites: int, seed: int = 0) -> dict[str, Any]:
    """One secure-aggregation round of ``sites`` sites; seconds per site and at the server."""
    params = params_for(sites, NORM_BOUND, MAX_WEIGHT)
    identity = {i: Ed25519PrivateKey.generate() for i in range(1, sites + 1)}
    public = {i: key.public_key() for i, key in identity.items()}
    members = {i: SecAggSite(params, i, ROUND_CONTEXT, identity[i]) for i in identity}
    server = SecAggServer(params, ROUND_CONTEXT, public, coordinates)
    rng = np.random.default_rng(seed)
    deltas = {i: (rng.standard_normal(coordinates) * 1e-3).astype(np.float32) for i in identity}
    site_s: dict[int, dict[str, Clock]] = {i: {} for i in identity}
    server_s: dict[str, Clock] = {}
    adverts = {i: _timed(site_s[i], "advertise", m.advertise) for i, m in members.items()}
    adverts = _timed(server_s, "collect_adverts", partial(server.collect_adverts, adverts))
    packets = {i: _timed(site_s[i], "share_keys", partial(m.share_keys, adverts))
               for i, m in members.items()}  # fmt: skip
    routed = _timed(server_s, "route_shares", partial(server.route_shares, packets))
    masked = {i: _timed(site_s[i], "masked_input",
                        partial(members[i].masked_input, routed[i], deltas[i], 100.0))
              for i in routed}  # fmt: skip
    lists = _timed(server_s, "collect_masked", partial(server.collect_masked, masked))
    signatures = {i: _timed(site_s[i], "confirm", partial(members[i].confirm, r))
                  for i, r in lists.items()}  # fmt: skip
    requests = _timed(server_s, "collect_confirmations",
                      partial(server.collect_confirmations, signatures))  # fmt: skip
    replies = {i: _timed(site_s[i], "unmask", partial(members[i].unmask, r))
               for i, r in requests.items()}  # fmt: skip
    result = _timed(server_s, "unmask", partial(server.unmask, replies))
    exact = sum(100.0 * deltas[i].astype(np.float64) for i in identity)
    error = float(np.abs(result.weighted_sum - exact).max())
    per_site = [sum(c.wall for c in costs.values()) for costs in site_s.values()]
    per_site_cpu = [sum(c.cpu for c in costs.values()) for costs in site_s.values()]
    return {"sites": sites, "coordinates": coordinates,
            "site_total_s_mean": statistics.mean(per_site), "site_total_s_max": max(per_site),
            "site_total_cpu_s_mean": statistics.mean(per_site_cpu),
            "site_masked_input_s_mean": statistics.mean(
                c["masked_input"].wall for c in site_s.values()),
            "server_stage_s": {k: c.wall for k, c in server_s.items()},
            "server_total_s": sum(c.wall for c in server_s.values()),
            "server_total_cpu_s": sum(c.cpu for c in server_s.values()),
            "bytes_up_per_site": 4 * (coordinates + 1) + (sites - 1) * CIPHERTEXT_BYTES
            + 3 * KEY_BYTES + 2 * SIGNATURE_BYTES,
            "max_abs_error": error}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="add 7,372,800 coordinates (29.5 MB)")
    args = parser.parse_args()
    started = header("bench_crypto")
    sizes = COORDINATES + (LARGE_COORDINATES if args.large else ())
    sealed = [row for c in sizes for row in sealed_costs(c, max(args.sites), args.repeats)]
    print_table(
        f"sealed envelope (per site: seal; coordinator: open, x{max(args.sites)} sites)",
        ["KEM", "delta bytes", "envelope bytes", "seal ms (CPU)", "open ms (CPU)",
         "open all ms"],
        [[r["kem"], f"{r['payload_bytes']:,}", f"{r['envelope_bytes']:,}",
          f"{r['seal_s'] * 1e3:.2f} ({r['seal_cpu_s'] * 1e3:.2f})",
          f"{r['open_s'] * 1e3:.2f} ({r['open_cpu_s'] * 1e3:.2f})",
          f"{r['server_open_all_s'] * 1e3:.1f}"] for r in sealed],
    )  # fmt: skip
    secure = [secure_sum_round(c, n) for n in args.sites for c in sizes]
    print_table(
        "secure sum (one round, full peer graph, no dropouts)",
        ["sites", "delta bytes (fp32)", "site total ms (CPU)", "of which masking ms",
         "coordinator ms (CPU)", "bytes up/site", "max |error|"],
        [[r["sites"], f"{4 * r['coordinates']:,}",
          f"{r['site_total_s_mean'] * 1e3:.1f} ({r['site_total_cpu_s_mean'] * 1e3:.1f})",
          f"{r['site_masked_input_s_mean'] * 1e3:.1f}",
          f"{r['server_total_s'] * 1e3:.1f} ({r['server_total_cpu_s'] * 1e3:.1f})",
          f"{r['bytes_up_per_site']:,}", f"{r['max_abs_error']:.1e}"] for r in secure],
    )  # fmt: skip
    write_result("bench_crypto", {**started, "sealed": sealed, "secure_sum": secure})
    return 0


if __name__ == "__main__":
    sys.exit(main())
