"""How one data set is split: among simulated sites, into a site's training and held-out
examples, and into the sample the coordinator evaluates on each round.

Every split is fixed by ``data.seed``; every impossible split is a ``ConfigError`` naming the
config key.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from common.config import DataConfig
from common.data import Dataset, Example, SiteData
from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# A Dirichlet draw can leave a site empty; redraw (with derived seeds) this many times at most.
DIRICHLET_DRAWS = 10


def _seed(seed: int, draw: int = 0) -> int:
    """A non-negative 32-bit seed for numpy derived from a config seed (which may be negative)."""
    return int(np.random.SeedSequence([seed % 2**32, draw]).generate_state(1)[0])


def _partition_keys(dataset: Dataset, cfg: DataConfig) -> list[str]:
    """The value each example is partitioned by: its ``data.by`` column, else its label."""
    if cfg.by is not None:
        keys = [example.group for example in dataset.examples]
        if any(key is None for key in keys):
            raise DataError(
                f"{dataset.source}: data.by = {cfg.by!r} but the examples have no {cfg.by!r} "
                f"values ({dataset.kind} data); load the file with the same data config"
            )
        return [str(key) for key in keys]
    names = dataset.label_names
    if dataset.kind == "classification" and names is not None:
        return [names[e.label] if e.label is not None else "" for e in dataset.examples]
    raise DataError(
        f"{dataset.source}: data.partition = {cfg.partition!r} needs data.by = '<column>' for "
        f"{dataset.kind} data (only classification data can be split by its labels)"
    )


def _partition_iid(num_examples: int, num_sites: int, seed: int) -> list[list[int]]:
    # IidPartitioner shards contiguously, so shuffle the indices first (as FederatedDataset does).
    order = np.random.default_rng(_seed(seed)).permutation(num_examples).tolist()
    partitioner = IidPartitioner(num_partitions=num_sites)
    partitioner.dataset = datasets.Dataset.from_dict({"index": order})
    return [list(partitioner.load_partition(i)["index"]) for i in range(num_sites)]


def _partition_dirichlet(keys: list[str], num_sites: int, cfg: DataConfig) -> list[list[int]]:
    table = datasets.Dataset.from_dict({"index": list(range(len(keys))), "group": keys})
    for draw in range(DIRICHLET_DRAWS):
        # min_partition_size=0: empty sites are redrawn here with a derived seed instead of by
        # the partitioner's own retry loop, which warns on every retry.
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="group",
            alpha=float(cfg.alpha),
            min_partition_size=0,
            self_balancing=False,
            seed=_seed(cfg.seed, draw),
        )
        partitioner.dataset = table
        parts = [list(partitioner.load_partition(i)["index"]) for i in range(num_sites)]
        if all(parts):
            return parts
        log.debug("Dirichlet draw %d left a site empty; drawing again", draw)
    raise ConfigError(
        f"data.partition = 'dirichlet' with data.alpha = {cfg.alpha} left a site with 0 "
        f"examples in {DIRICHLET_DRAWS} draws ({len(keys)} examples, {len(set(keys))} "
        f"distinct values); use a larger data.alpha or fewer federation.sites"
    )


def _partition_by_column(keys: list[str], num_sites: int, cfg: DataConfig) -> list[list[int]]:
    counts = Counter(keys)
    if len(counts) < num_sites:
        raise ConfigError(
            f"data.partition = 'by-column': data.by = {cfg.by!r} has {len(counts)} distinct "
            f"values but federation.sites = {num_sites}; use at most {len(counts)} sites"
        )
    # Most frequent values first, dealt round-robin, so that site sizes stay comparable.
    ranked = sorted(counts, key=lambda value: (-counts[value], value))
    site_of = {value: rank % num_sites for rank, value in enumerate(ranked)}
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for index, key in enumerate(keys):
        parts[site_of[key]].append(index)
    return parts


def _partition_pathological(keys: list[str], num_sites: int, cfg: DataConfig) -> list[list[int]]:
    """Each site holds ``data.labels-per-site`` values; every value is held by some site.

    The values, in a seeded random order and cycled, fill ``sites x k`` slots; site ``i``
    takes slots ``[i*k, (i+1)*k)``. A value held by several sites has its examples dealt
    among them in a seeded random order, so that no example is lost or duplicated. Without
    ``data.labels-per-site``, k = ceil(values / sites): the sites' values barely overlap.
    """
    values = sorted(set(keys))
    k = cfg.labels_per_site or -(-len(values) // num_sites)
    if k > len(values) or num_sites * k < len(values):
        raise ConfigError(
            f"data.partition = 'pathological': data.labels-per-site = {k} with "
            f"federation.sites = {num_sites} cannot cover the {len(values)} distinct values "
            f"once each; expected {-(-len(values) // num_sites)} <= k <= {len(values)}"
        )
    rng = np.random.default_rng(_seed(cfg.seed))
    order = [values[i] for i in rng.permutation(len(values))]
    holders: dict[str, list[int]] = {value: [] for value in values}
    for slot in range(num_sites * k):
        holders[order[slot % len(values)]].append(slot // k)
    by_value: dict[str, list[int]] = {value: [] for value in values}
    for index, key in enumerate(keys):
        by_value[key].append(index)
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for value in values:
        indices = [by_value[value][i] for i in rng.permutation(len(by_value[value]))]
        sites = holders[value]
        for position, index in enumerate(indices):
            parts[sites[position % len(sites)]].append(index)
    return parts


def partition(dataset: Dataset, num_sites: int, cfg: DataConfig) -> list[list[int]]:
    """Indices of ``dataset.examples`` for each of ``num_sites`` sites, fixed by ``cfg.seed``.

    ``iid`` deals shuffled examples evenly; ``dirichlet`` draws each site's share of every
    ``data.by`` value (or label) from Dirichlet(``data.alpha``): small alpha, skewed sites;
    ``by-column`` gives every value of ``data.by`` to one site; ``pathological`` gives each
    site ``data.labels-per-site`` values (``_partition_pathological``). One site gets everything.
    """
    total = len(dataset.examples)
    if num_sites < 1 or num_sites > total:
        raise ConfigError(
            f"federation.sites = {num_sites}: expected between 1 and the {total} examples "
            f"in {dataset.source}"
        )
    if num_sites == 1:
        return [list(range(total))]
    if cfg.partition == "iid":
        parts = _partition_iid(total, num_sites, cfg.seed)
    elif cfg.partition == "dirichlet":
        parts = _partition_dirichlet(_partition_keys(dataset, cfg), num_sites, cfg)
    elif cfg.partition == "pathological":
        parts = _partition_pathological(_partition_keys(dataset, cfg), num_sites, cfg)
    else:
        parts = _partition_by_column(_partition_keys(dataset, cfg), num_sites, cfg)
    for site, indices in enumerate(parts):
        if not indices:
            raise ConfigError(
                f"data.partition = {cfg.partition!r} left site {site} with 0 examples; use a "
                "larger data.alpha or fewer federation.sites"
            )
    log.info(
        "partition %s over %d sites: sizes %s", cfg.partition, num_sites, [len(p) for p in parts]
    )
    return [sorted(indices) for indices in parts]


def split_holdout(
    examples: list[Example],
    fraction: float,
    seed: int,
    max_train: int | None = None,
    max_heldout: int | None = None,
) -> SiteData:
    """Shuffle (seeded) and keep ``round(fraction * n)`` examples back for evaluation.

    At least one example is held out when ``fraction > 0`` and there are two or more, and at
    least one is left to train on. The caps apply after the split.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.holdout = {fraction}: expected a fraction in [0, 1)")
    order = list(examples)
    random.Random(seed).shuffle(order)
    count = round(fraction * len(order))
    if fraction > 0 and len(order) >= 2:
        count = min(max(count, 1), len(order) - 1)
    heldout, train = order[:count], order[count:]
    if max_train is not None:
        train = train[:max_train]
    if max_heldout is not None:
        heldout = heldout[:max_heldout]
    return SiteData(train=train, heldout=heldout)


def eval_sample(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """At most ``limit`` examples, drawn at random (seeded), in their file order.

    Evaluation files are often sorted by label (banking77's test split is): their first
    ``limit`` rows would cover a few classes only.
    """
    if len(examples) <= limit:
        return list(examples)
    chosen = sorted(random.Random(_seed(seed, 1)).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def site_data(dataset: Dataset, site: int, num_sites: int, cfg: DataConfig) -> SiteData:
    """The examples of simulated site ``site`` (0-based): its partition, split and capped."""
    if not 0 <= site < num_sites:
        raise ConfigError(f"site {site}: expected a site number in [0, {num_sites})")
    indices = partition(dataset, num_sites, cfg)[site]
    return split_holdout(
        [dataset.examples[i] for i in indices],
        cfg.holdout,
        cfg.seed + site,
        cfg.max_examples_per_site,
        cfg.max_eval_examples,
    )
