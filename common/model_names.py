"""Names of base models and data sets: aliases, Hugging Face hub ids, the local HF cache.

A model is named portably (an alias or a hub id) and resolved to a local folder; adapters and
model cards record the portable name, never the folder it was found in. This module imports
neither torch nor transformers, so that the registry and config checks can use it cheaply.

Hub ids are resolved through ``huggingface_hub.snapshot_download`` on the cache laid out as
huggingface_hub lays it out (``models--org--name/snapshots/<rev>/...`` with ``refs/main``).
Downloading happens only when the user allows it (``model.download = true``) and the machine is
not offline (``HF_HUB_OFFLINE``); otherwise the cache is the only source.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.errors import ModelError

SMOLLM2_ALIAS = "smollm2-135m"
MINILM_ALIAS = "minilm-l6"
TINY_LLAMA = "tiny-llama"
ALIASES = (SMOLLM2_ALIAS, MINILM_ALIAS, TINY_LLAMA)

# The hub repository each alias's weights come from, for model cards (``base_model``). The
# MiniLM package embeds the hub files as they are; SmolLM2's alias is its Q4_1 GGUF, dequantized
# (hence "quantized" as the relation); tiny-llama is random and has none.
ALIAS_HUB_IDS = {
    MINILM_ALIAS: "sentence-transformers/all-MiniLM-L6-v2",
    SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct",
}
ALIAS_LICENSES = {MINILM_ALIAS: "apache-2.0", SMOLLM2_ALIAS: "apache-2.0"}

# What a model needs of a hub repository: config, weights, tokenizer, the card (for its
# licence). Not pytorch_model.bin, ONNX or GGUF copies, which can be many times larger.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "README.md"]

# huggingface_hub's own repo-id rule: [org/]name of letters, digits, "-", "_", "."; no "--",
# no "..", not starting or ending with "-" or ".".
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_CACHE_FOLDER = re.compile(r"^(models|datasets)--(.+)$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repository id (``org/name`` or ``name``)."""
    return bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name


# Suffixes of single data files: a name ending in one of these is a file, never a hub name.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".tsv", ".parquet", ".arrow")


def looks_like_dataset_name(name: str) -> bool:
    """A hub data set name (``org/name`` or ``name``) rather than a file: no file suffix."""
    return looks_like_hub_id(name) and not name.lower().endswith(DATA_FILE_SUFFIXES)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, when it is imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache() -> Path:
    """The hub cache folder, read now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (huggingface_hub's own order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def resolve_hub_model(repo_id: str, download: bool) -> Path:
    """The local snapshot folder of hub model ``repo_id``, from the cache or downloaded.

    Raises
    ------
    ModelError
        When the id is not in the cache and may not (or cannot) be downloaded; the message
        names the id, the cache folder searched and how to fetch it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = hub_cache()
    local_only = not download or hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=cache,
            local_files_only=local_only,
            allow_patterns=MODEL_FILE_PATTERNS,
        )
    except HFValidationError as exc:
        raise ModelError(f"model.name = {repo_id!r}: not a hub id ({exc})") from None
    except LocalEntryNotFoundError:
        raise ModelError(_not_cached(repo_id, cache, download)) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"model.name = {repo_id!r}: download failed: {exc}") from None
    return Path(str(folder))


def _not_cached(repo_id: str, cache: Path, download: bool) -> str:
    where = f"model.name = {repo_id!r}: not an alias ({', '.join(ALIASES)}) or local folder"
    searched = f"and not in the Hugging Face cache {cache}"
    if download and hub_offline():
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    elif download:
        why = "and the hub could not be reached"
    else:
        why = "downloads are off (set model.download = true to allow one)"
    fetch = f"`hf download {repo_id}` on a connected machine and copy {cache} here"
    return f"{where}, {searched}; {why}; fetch it with {fetch}"


def model_license(name: str) -> str | None:
    """The licence of a base model where it is known: an alias's, or the ``license`` field of
    the model card (``README.md``) in its local folder or cached hub snapshot. Never downloads."""
    if name in ALIASES:
        return ALIAS_LICENSES.get(name)
    path = Path(name).expanduser()
    folder: Path | None = path.parent if path.is_file() else path if path.is_dir() else None
    if folder is None and looks_like_hub_id(name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(name, cache_dir=hub_cache(), local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError):
            return None
    return card_license(folder / "README.md") if folder is not None else None


def card_license(readme: Path) -> str | None:
    """The ``license`` of a Hugging Face card's YAML header, or None (no file, no field)."""
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load
    from yaml import YAMLError  # huggingface_hub parses the header with PyYAML

    try:
        meta = metadata_load(readme)
    except (YAMLError, ValueError, OSError, UnicodeDecodeError):
        return None
    value = (meta or {}).get("license")
    return value if isinstance(value, str) and value else None


def hub_id_of_cache_path(path: Path) -> str | None:
    """``org/name`` when ``path`` lies inside a hub cache snapshot (``models--org--name/``)."""
    for part in Path(path).parts:
        match = _CACHE_FOLDER.fullmatch(part)
        if match and match.group(1) == "models":
            return match.group(2).replace("--", "/")
    return None


def portable_model_name(name: str) -> str | None:
    """The name an adapter records for its base: an alias or hub id, never a local path.

    A path inside a hub cache snapshot gives its hub id; any other local folder or file has
    no portable name (None): the fingerprint alone identifies it.
    """
    if name in ALIASES:
        return name
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or name.startswith((".", "~")):
        return hub_id_of_cache_path(path.resolve()) if path.exists() else None
    return name if looks_like_hub_id(name) else None


def card_base_model(name: str | None) -> str | None:
    """The hub id a model card's ``base_model`` field names (an alias maps to its source)."""
    if name is None:
        return None
    if name in ALIASES:
        return ALIAS_HUB_IDS.get(name)
    return name if looks_like_hub_id(name) and "/" in name else None
