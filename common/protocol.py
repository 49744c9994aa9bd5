"""The wire format: every record and key that travels between coordinator and sites.

Defined once here; the apps never spell a key as a string literal. Keys are kebab-case, as in
Flower's own messages.

A train instruction (coordinator -> site) carries:
  ``global`` (ArrayRecord)       the global adapter tensors of each module, full state
  ``fedlora`` (ConfigRecord)     protocol version, run id, round, module version, base
                                 fingerprint, and the site plan (training config, JSON)
A train reply (site -> coordinator) carries:
  ``update`` (ConfigRecord)      the site's base fingerprint, module version it trained on,
                                 and the encoded delta bytes (see ``common.encoding``)
  ``metrics`` (MetricRecord)     examples, train loss, seconds, peak memory (bytes)
An evaluate instruction carries ``global`` + ``fedlora``; its reply carries ``metrics``.
"""

from __future__ import annotations

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

# Keys of the update ConfigRecord (site -> coordinator).
KEY_SITE = "site"
KEY_DELTA = "delta"
KEY_ENCODING = "encoding"

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

# Flower requires the key "num-examples" for its weighted averages; we reuse the same name.
