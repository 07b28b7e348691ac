"""Which model configs the executor runs, and reading a config's optional fields.

Supported families (``config.model_type``): ``llama`` (Llama 2/3, SmolLM2, TinyLlama, ...),
``mistral`` and ``qwen2``. They share one block structure and differ only in details the config
spells out (q/k/v bias, head_dim, RoPE parameters, tied embeddings). transformers is used for its
config classes only; none of its modeling code runs here.
"""

from __future__ import annotations

from typing import Any

#: ``config.model_type`` values we run, and the checkpoint class name of each.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
#: ``config.architectures`` entries accepted (the inverse view of :data:`SUPPORTED_MODEL_TYPES`).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(SUPPORTED_MODEL_TYPES.values())


class UnsupportedModelError(ValueError):
    """The config describes a model this executor cannot run."""


def check_model_type(model_type: Any, architectures: Any, where: str = "") -> str:
    """Return ``model_type`` if we run it, else raise :class:`UnsupportedModelError`.

    Args:
        model_type, architectures: the config's fields (either may be missing: None).
        where: appended to "unsupported model architecture" in the message, e.g. ``" in <path>"``.
    """
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    supported = ", ".join(f"{a} ({t})" for t, a in SUPPORTED_MODEL_TYPES.items())
    raise UnsupportedModelError(
        f"unsupported model architecture{where}: model_type={model_type!r}, architectures={architectures}; "
        f"supported: {supported}"
    )


def check_supported(config: Any) -> str:
    """Return ``config.model_type`` if we run it, else raise :class:`UnsupportedModelError`."""
    archs = list(getattr(config, "architectures", None) or [])
    return check_model_type(getattr(config, "model_type", None), archs)


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name``, or ``default`` where the config lacks it or holds None."""
    value = getattr(config, name, None)
    return default if value is None else value
