"""Our top-level ``kernels`` package against Hugging Face's ``kernels`` distribution.

transformers imports ``kernels`` (the Hugging Face hub-kernels project) at import time whenever a
distribution of that name in its accepted version range is installed. In this project ``kernels``
is our Triton package, so that import would fail inside ``import transformers.activations`` and take
the tokenizer, the model configs and the HF reference tests down with it (seen with transformers
5.25.0, which installs Hugging Face's ``kernels`` as a hard dependency; pyproject.toml pins below it).
"""

import importlib.metadata
from pathlib import Path

from transformers.utils import import_utils


def test_transformers_does_not_see_a_hub_kernels_package():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    where = dist.locate_file("") if dist is not None else None
    assert not import_utils.is_kernels_available(), (
        f"Hugging Face's `kernels` {dist.version if dist else ''} is installed ({where}) and clashes with "
        "pagedserve's kernels/ package: `pip uninstall kernels` and keep transformers < 5.25 (pyproject.toml)"
    )


def test_transformers_layers_import_beside_our_kernels():
    import kernels
    import transformers.activations  # noqa: F401  (fails when transformers imports our kernels as its own)

    assert Path(kernels.__file__).parent == Path(__file__).resolve().parents[2] / "kernels"
