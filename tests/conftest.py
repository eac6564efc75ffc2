import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def fixture_ckpt(tmp_path_factory):
    """factory(group_size=-1, weight_bits=4, fmt='safetensors', zoo_style=False) -> (dir, fp32 state, config)."""
    from vllm_qserve.convert.fixture import make_fixture_checkpoint

    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            d = tmp_path_factory.mktemp("ckpt")
            cache[key] = make_fixture_checkpoint(str(d), **kw)
        return cache[key]

    return make
