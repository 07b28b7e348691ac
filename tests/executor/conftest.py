import pytest
import torch


@pytest.fixture(scope="session")
def make_engine(smollm):
    """Factory of SmolLM2 engines (fp32, CPU), each over a fresh in-process block manager.

    ``make_engine(block_size=..., prefix_caching=True, **EngineConfig fields)`` returns
    ``(Engine, InProcessBlockManager)``; ``num_blocks`` defaults to 256.
    """
    from blockmgr.client import InProcessBlockManager
    from blockmgr.manager import BlockManager
    from executor.engine import Engine, EngineConfig

    model, tok = smollm

    def make(*, block_size: int, num_blocks: int = 256, prefix_caching: bool = True, **config):
        bm = InProcessBlockManager(BlockManager(enable_prefix_caching=prefix_caching))
        engine = Engine(model, bm, EngineConfig(block_size=block_size, num_blocks=num_blocks, **config),
                        {tok.eos_token_id})
        return engine, bm

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for the module's tests; the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
