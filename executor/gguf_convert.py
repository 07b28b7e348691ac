"""Convert a GGUF file into a Hugging Face model directory (fp32 safetensors, config, tokenizer).

transformers' GGUF reader (the ``gguf`` package) dequantizes the weights and rebuilds the
tokenizer with its chat template; nothing is downloaded. :func:`executor.model_loader.resolve_model_dir`
calls this once per GGUF file and caches the result.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from executor.weights import save_safetensors

logger = logging.getLogger("pagedserve.executor")

#: Bump when the conversion output changes, so older cache entries are not reused.
CONVERTER_VERSION = 1
#: Written last into every converted directory; records where it came from.
SOURCE_FILE = "pagedserve-source.json"


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a Hugging Face directory ``out_dir`` (which must exist).

    Writes ``config.json`` (without ``quantization_config``, dtype float32), ``model.safetensors``
    (fp32; without ``lm_head.weight`` when the embeddings are tied), ``tokenizer.json`` and
    ``tokenizer_config.json`` (with the chat template, also as ``chat_template.jinja``),
    ``generation_config.json`` and, last, :data:`SOURCE_FILE`. Uses transformers' GGUF reader
    (needs the ``gguf`` package) and never touches the network.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("converting %s to %s (first use of this file; later starts reuse it)", gguf_path, out_dir)

    logger.info("reading the tokenizer from %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    logger.info("dequantizing the weights of %s to fp32", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))

    config_dict = config.to_diff_dict()  # what save_pretrained writes: no class defaults
    for key in ("quantization_config", "_name_or_path", "torch_dtype"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    tensors = {name: t.detach().to(torch.float32) for name, t in state.items()}
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info("writing %d fp32 tensors (%.0f MiB) to model.safetensors", len(tensors), n_bytes / 2**20)
    save_safetensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"}, desc="Writing model.safetensors")
    del tensors, state

    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    del model

    tokenizer.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer, config_dict)

    source = {
        "source": str(gguf_path.resolve()),
        "name": gguf_path.name,
        "size": gguf_path.stat().st_size,
        "converter_version": CONVERTER_VERSION,
        "transformers_version": _version("transformers"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)


def _patch_tokenizer_config(path: Path, tokenizer, config_dict: dict) -> None:
    """Keep the chat template inside ``tokenizer_config.json`` and give a real ``model_max_length``."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if getattr(tokenizer, "chat_template", None):
        data["chat_template"] = tokenizer.chat_template
    max_len = data.get("model_max_length")
    if (max_len is None or max_len > 10**9) and config_dict.get("max_position_embeddings"):
        data["model_max_length"] = int(config_dict["max_position_embeddings"])
    for key in ("is_local", "local_files_only"):  # facts about this load, not about the tokenizer
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # pragma: no cover
        return "unknown"
