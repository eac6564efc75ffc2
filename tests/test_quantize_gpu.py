"""The quantizer and the perplexity evaluator on a GPU (skipped without one).

* ``quantize --device cuda`` produces a valid checkpoint of the same quality as on the CPU;
* a checkpoint quantized on the CPU loads unchanged in vLLM on the GPU (CUDA kernels, fp16) and its
  perplexity there matches the PyTorch simulation of QServe's numerics computed on the CPU.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.conftest import requires_gpu
from tests.test_quantize_e2e import _eval_cli, _kl_to_fp, _quantize, tiny_qwen2_dir

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.test_quantize_e2e import TEXT

    import torch

    root = tmp_path_factory.mktemp("quantize-gpu")
    text = root / "text.txt"
    g = torch.Generator().manual_seed(0)
    words = TEXT.split()
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=g)))
    return {"root": str(root), "model": tiny_qwen2_dir(str(root)), "text": str(text)}


def test_quantize_on_gpu(workspace):
    from transformers import Qwen2Config

    from vllm_qserve.checkpoint import inspect_checkpoint

    gpu = _quantize(workspace, "qoq-gpu", "--group-size", "128", "--device", "cuda")
    cpu = _quantize(workspace, "qoq-cpu", "--group-size", "128", "--device", "cpu")
    rtn = _quantize(workspace, "rtn", "--group-size", "128", "--method", "rtn")
    cfg = json.load(open(os.path.join(gpu, "config.json")))
    inspect_checkpoint(gpu, Qwen2Config(**cfg))
    assert json.load(open(os.path.join(gpu, "quantize_log.json")))["device"] == "cuda"
    kl_gpu, kl_cpu, kl_rtn = (_kl_to_fp(workspace, d) for d in (gpu, cpu, rtn))
    print(f"KL to fp: QoQ on GPU {kl_gpu:.4f}, on CPU {kl_cpu:.4f}, RTN {kl_rtn:.4f}")
    assert kl_gpu < 0.5 * kl_rtn
    assert kl_gpu < 1.5 * kl_cpu  # same recipe; GPU arithmetic differs only in rounding


@pytest.mark.slow
@pytest.mark.parametrize("group_size", ["-1", "128"])
def test_cpu_made_checkpoint_serves_on_gpu(workspace, tmp_path, group_size):
    ckpt = _quantize(workspace, f"qoq-cpu{group_size}", "--group-size", group_size, "--device", "cpu")
    gpu = _eval_cli(tmp_path, "--model", ckpt, "--data", workspace["text"], "--seq-len", "256", "--max-windows", "6",
                    "--dtype", "float16")
    sim = _eval_cli(tmp_path, "--model", ckpt, "--data", workspace["text"], "--seq-len", "256", "--max-windows", "6",
                    "--backend", "torch", "--kv-bits", "16")
    assert gpu["scored_tokens"] == sim["scored_tokens"] and gpu["dtype"] == "float16"
    # fp16 activations on the GPU against the fp32 simulation: activation codes flip more often than in fp32
    assert math.isclose(gpu["ppl"], sim["ppl"], rel_tol=0.03), (gpu["ppl"], sim["ppl"])
