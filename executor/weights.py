"""Streaming safetensors writer with a progress bar.

``safetensors.torch.save_file`` writes a whole state dict in one call, with no progress report and
(for some versions) a full in-memory copy. The format is simple enough to stream tensor by tensor
(https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded
with spaces to a multiple of 8 bytes, then the tensors' raw little-endian bytes back to back in
header order. Files written here are read by ``safetensors.safe_open`` like any other.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from tqdm.auto import tqdm

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    progress: bool = True,
    desc: str = "Writing tensors",
) -> int:
    """Write ``tensors`` to ``path`` in safetensors format, one tensor at a time; returns bytes written.

    Tensors are moved to the CPU one by one (never all at once). Names keep the dict's order.
    The file is flushed and fsynced before returning.
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
        raise RuntimeError("save_safetensors writes raw little-endian bytes; big-endian hosts are not supported")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    with open(path, "wb") as f, tqdm(
        total=offset, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=None if progress else True,  # None: no bar when stderr is not a terminal (a log file)
    ) as bar:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            cpu = t.detach().to("cpu").contiguous().reshape(-1)
            if cpu.numel():
                f.write(memoryview(cpu.view(torch.uint8).numpy()))
            bar.update(cpu.numel() * cpu.element_size())
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


__all__ = ["save_safetensors"]
