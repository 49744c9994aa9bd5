"""The wire format: every record and key that travels between coordinator and sites.

Defined once here; the apps never spell a key as a string literal. Keys are kebab-case, as in
Flower's own messages.

A train instruction (coordinator -> site) carries:
  ``global`` (ArrayRecord)       the global adapter tensors of each module, full state
  ``fedlora`` (ConfigRecord)     protocol version, run id, round, module version, base
                                 fingerprint, and the site plan (training config, JSON)
A train reply (site -> coordinator) carries:
  ``update`` (ConfigRecord)      the site's base fingerprint, the version it trained on,
                                 and per sent module ``delta:<module>``: the encoded delta
                                 (``common.encoding``), sealed to that module when sealed
  Global state travels as one ArrayRecord keyed ``<module>/<peft key>`` (``common.modules``).
  ``metrics`` (MetricRecord)     examples, train loss, seconds, peak memory (bytes), clip
                                 scale: in the clear in mode ``none`` only. Sealed mode
                                 sends them as ``report`` in ``update``, sealed and signed
                                 like a delta (envelope module ``@site-report``); secure-sum
                                 mode does not send them (they would single a site out).
An evaluate instruction carries ``global`` + ``fedlora``; its reply carries ``metrics``.
An identify query (Flower message type ``query``; ``server.cohort``, only when the coordinator
samples cohorts) carries ``fedlora`` alone, signed; its reply is ``update`` with ``KEY_SITE``.

The global version travels in one of three forms (``KEY_GLOBAL_FORM``, ``common.downlink``):
``full`` (``global`` as above), ``step`` (``global-step``: the encoded step from version
``KEY_GLOBAL_BASE``, a version the site confirmed) or ``reference`` (nothing: the site holds the
version). Every instruction's header carries ``KEY_GLOBAL_SHA256``, the digest of the version's
state, which the site checks whatever the form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from common.errors import UpdateRejected

PROTOCOL_VERSION = "fedlora/1"

# Record names inside a Flower RecordDict.
GLOBAL_RECORD = "global"
HEADER_RECORD = "fedlora"
UPDATE_RECORD = "update"
METRICS_RECORD = "metrics"

# Keys of the header ConfigRecord (coordinator -> site).
KEY_PROTOCOL = "protocol"
KEY_RUN_ID = "run-id"
KEY_ROUND = "round"
KEY_MODULE = "module"
KEY_VERSION = "version"
KEY_FINGERPRINT = "base-fingerprint"
KEY_PLAN = "plan"
# The coordinator's Ed25519 signature over the whole instruction (``common.instructions``).
KEY_SIGNATURE = "signature"

# How the global version travels (``common.downlink``): its form, the version a step starts
# from, the SHA-256 of the version's state; a step's payload is ``GLOBAL_STEP_RECORD[KEY_DELTA]``.
KEY_GLOBAL_FORM = "global-form"
KEY_GLOBAL_BASE = "global-base"
KEY_GLOBAL_SHA256 = "global-sha256"
GLOBAL_STEP_RECORD = "global-step"
FORM_FULL = "full"
FORM_STEP = "step"
FORM_REFERENCE = "reference"
GLOBAL_FORMS = (FORM_FULL, FORM_STEP, FORM_REFERENCE)

# Secure-sum stages: the stage name, public parameters and site numbering travel in the header;
# stage payloads (adverts, sealed shares, masked input, survivor list and confirmation, unmask
# requests/replies) in SECAGG_RECORD.
KEY_STAGE = "stage"
KEY_SECAGG_PARAMS = "secagg-params"
KEY_SITE_NUMBERS = "site-numbers"
# The enrollment authority's signed roster of site identity keys (``common.roster``): sites
# check their neighbours' adverts against it, never against keys the coordinator chose.
KEY_ROSTER = "roster"
SECAGG_RECORD = "secagg"
STAGE_TRAIN = "train"
STAGE_SHARE = "secagg-share"
STAGE_MASK = "secagg-mask"
STAGE_CONFIRM = "secagg-confirm"  # each survivor signs the one survivor list (consistency)
STAGE_UNMASK = "secagg-unmask"

# Keys of the update ConfigRecord (site -> coordinator): one payload per sent module.
KEY_SITE = "site"
KEY_DELTA = "delta"
KEY_ENCODING = "encoding"
_DELTA_PREFIX = KEY_DELTA + ":"


def delta_key(module: str) -> str:
    """The update-record key of one module's delta payload: ``delta:<module>``."""
    return _DELTA_PREFIX + module


def delta_modules(keys: Iterable[str]) -> list[str]:
    """The modules a reply's update-record keys carry payloads for, sorted."""
    return sorted(key[len(_DELTA_PREFIX) :] for key in keys if key.startswith(_DELTA_PREFIX))


# SCAFFOLD (train.scaffold, client/drift.py): the train instruction carries the coordinator's
# control variate c (an ArrayRecord of ``<module>/<key>``), and a train reply one payload per
# sent module with the site's ``c_i(new) - c_i``, encoded like the delta and, when sealed,
# bound to the envelope "module" ``@control:<module>``, which no real module name can equal.
CONTROL_RECORD = "control"
_CONTROL_PREFIX = "control:"


def control_key(module: str) -> str:
    """The update-record key of one module's control-variate change: ``control:<module>``."""
    return _CONTROL_PREFIX + module


# Secure sum: a site's masked vector holds its delta and, after it, its control-variate change,
# each tensor under ``~control/<module>/<key>`` ('~' sorts after every module name).
CONTROL_FLAT_PREFIX = "~control/"


def control_envelope_module(module: str) -> str:
    """The envelope binding of one module's control-variate change: ``@control:<module>``."""
    return "@" + _CONTROL_PREFIX + module


# Keys of the metrics MetricRecord (site -> coordinator).
METRIC_EXAMPLES = "num-examples"
METRIC_TRAIN_LOSS = "train-loss"
METRIC_EVAL_LOSS = "eval-loss"
METRIC_EVAL_ACCURACY = "eval-accuracy"
METRIC_EVAL_TOKENS = "eval-tokens"
METRIC_SECONDS = "seconds"
METRIC_PEAK_MEMORY = "peak-memory-bytes"
METRIC_STEPS = "steps"
METRIC_CLIP_SCALE = "clip-scale"

# A train reply's per-site figures, sealed (sealed mode): ``update[KEY_REPORT]`` is the envelope
# of ``report_bytes``, bound to this envelope "module", which no real module name can equal.
KEY_REPORT = "report"
REPORT_MODULE = "@site-report"
REPORT_KEYS = frozenset(
    {
        METRIC_EXAMPLES,
        METRIC_TRAIN_LOSS,
        METRIC_SECONDS,
        METRIC_PEAK_MEMORY,
        METRIC_STEPS,
        METRIC_CLIP_SCALE,
    }
)
# An evaluate reply's figures, sealed the same way (every mode with keys: sealed, secure-sum).
EVAL_REPORT_MODULE = "@eval-report"
EVAL_REPORT_KEYS = frozenset({METRIC_EXAMPLES, METRIC_EVAL_LOSS, METRIC_EVAL_TOKENS})
EVAL_REPORT_OPTIONAL = frozenset({METRIC_EVAL_ACCURACY})  # classification only
MAX_REPORT_BYTES = 1024


def report_bytes(values: Mapping[str, int | float]) -> bytes:
    """A site's figures as canonical JSON (the plaintext of a sealed report)."""
    return json.dumps(dict(values), sort_keys=True, allow_nan=False).encode("ascii")


def parse_report(
    data: bytes,
    keys: frozenset[str] = REPORT_KEYS,
    optional: frozenset[str] = frozenset(),
) -> dict[str, int | float]:
    """An opened report: every one of ``keys``, perhaps some of ``optional`` and nothing else,
    each a finite number; else UpdateRejected."""
    if len(data) > MAX_REPORT_BYTES:
        raise UpdateRejected(f"site report of {len(data)} bytes exceeds {MAX_REPORT_BYTES}")
    try:
        values = json.loads(data)
    except ValueError:
        raise UpdateRejected("site report is not JSON") from None
    if not isinstance(values, dict) or not keys <= set(values) <= keys | optional:
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise UpdateRejected(f"site report holds {got}, expected {sorted(keys)}")
    for key, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise UpdateRejected(f"site report {key}: {value!r} is not a finite number")
    return values


# Flower requires the key "num-examples" for its weighted averages; we reuse the same name.


def secure_sum_context(header: Mapping[str, Any]) -> bytes:
    """The public bytes that bind every signature, key and mask of one secure-sum round."""
    fields = (KEY_RUN_ID, KEY_ROUND, KEY_MODULE, KEY_VERSION, KEY_FINGERPRINT)
    return "|".join([PROTOCOL_VERSION, *(str(header[key]) for key in fields)]).encode()
