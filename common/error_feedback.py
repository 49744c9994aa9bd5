"""Error feedback for quantised up-links: what rounding dropped this round is sent next round.

A site that sends its delta in int8 or int4 (``common.encoding``) loses the rounding error
every round; where a coordinate's delta is smaller than half a quantisation step, it is lost
every round, and a small but steady pull never reaches the aggregate. With error feedback
(Seide et al. 2014; Karimireddy et al. 2019, EF-SGD) the site keeps the residual ``e`` and
sends ``Q(delta + e)``, keeping ``e' = delta + e - Q(delta + e)``. What the site has sent over
T rounds then differs from the sum of its true deltas by only the last residual (one
quantisation error, whatever T), instead of up to T of them. Pure: the site keeps the
residual in its store (``client.kept_states``, folder ``residual``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from common.adapters import AdapterState
from common.encoding import Encoding, decode_delta, encode_delta
from common.errors import UpdateRejected


def encode_with_feedback(
    delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor], encoding: Encoding
) -> tuple[bytes, AdapterState]:
    """``encode_delta(delta + residual)`` and the new residual (what the encoding dropped).

    ``residual`` may be empty (the first round); otherwise its keys and shapes are the
    delta's, else ``UpdateRejected`` (the site's modules changed within a run).
    """
    if residual and (
        residual.keys() != delta.keys() or any(residual[k].shape != delta[k].shape for k in delta)
    ):
        raise UpdateRejected(
            "the kept quantisation residual does not fit this delta (other tensors or shapes)"
        )
    corrected = {
        key: tensor.detach().to(torch.float32)
        + (residual[key].to(tensor.device, torch.float32) if residual else 0.0)
        for key, tensor in delta.items()
    }
    payload = encode_delta(corrected, encoding)
    expected = {key: tuple(tensor.shape) for key, tensor in corrected.items()}
    sent = decode_delta(payload, len(payload), expected)
    remaining = {key: corrected[key] - sent[key].to(corrected[key].device) for key in corrected}
    return payload, remaining
