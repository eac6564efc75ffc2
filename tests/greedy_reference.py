"""How closely vLLM's greedy generation on the GPU follows the PyTorch reference path of the same checkpoint, and
the noise floor to judge it by (shared by the real-model GPU tests: SmolLM2 in fp16, Gemma 3 in bf16).

A real model served at 16-bit precision cannot match an fp32 reference token for token: 16-bit activations keep
3 (fp16) or 2 (bf16) significant digits, and KV4 rounds keys computed in another order into other 4-bit codes, so
wherever the reference's top two tokens are close the paths part, and after that each follows its own text.  So
both vLLM's greedy tokens and the reference's own greedy tokens at the serving dtype (on the CPU) are scored,
teacher-forced, by the fp32 reference: per step, the gap between the fp32 reference's best log-probability and
that of the token taken (0 = its argmax).  vLLM must follow the fp32 reference about as closely as the reference
itself does at the serving dtype; a kernel error puts it far off (most tokens wrong, by whole nats).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_checkpoint(env_var: str, gguf_name: str, out_dir: str, group_size: int) -> str:
    """The real model's QServe checkpoint for a GPU test: $env_var if set, else a QoQ W4A8KV4 one quantized here
    from the cached GGUF (`vllm-qserve fetch-gguf <gguf_name>`; 16 calibration sequences sampled from the model).
    Skips the test when neither is there."""
    import pytest

    given = os.environ.get(env_var)
    if given:
        return given
    from vllm_qserve.convert.gguf import GGUFFetchError, fetch_known_gguf

    try:
        gguf = fetch_known_gguf(gguf_name)
    except GGUFFetchError as e:
        pytest.skip(f"{gguf_name} is not available here: {e}")
    out = os.path.join(out_dir, f"qoq_w4a8kv4_g{group_size}")
    subprocess.run([sys.executable, "-m", "vllm_qserve.cli", "quantize", "--model", gguf, "--output", out,
                    "--group-size", str(group_size), "--kv-bits", "4", "--calib-samples", "16"], check=True, cwd=ROOT)
    return out


def vllm_generate(ckpt: str, prompts: list, dtype: str, max_tokens: int, max_model_len: int = 512) -> list:
    """Greedy generations of vLLM (compiled, CUDA graphs) in a fresh process (tests/vllm_runner.py)."""
    args = {"model": ckpt, "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens, "enforce_eager": False,
            "engine_kwargs": {"max_model_len": max_model_len, "gpu_memory_utilization": 0.3,
                              "kv_cache_memory_bytes": 1 << 30}}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "vllm_runner.py"), json.dumps(args)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON ")]
    assert proc.returncode == 0 and lines, f"vLLM run failed:\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT_JSON "):])["generations"]


def fp32_gaps(ref32, prompt: list, tokens: list) -> list:
    """Per generated token: the fp32 reference's best log-probability minus that of the token (0 = its argmax),
    teacher-forced on the tokens (every step is scored, not only those before a first difference)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(ref32(torch.tensor([prompt + tokens]))[0].double(), -1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return (rows.max(-1).values - rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]).tolist()


def greedy(model, prompt: list, n: int) -> list:
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def summarize(gaps: list) -> dict:
    return {"agreement": sum(g == 0.0 for g in gaps) / len(gaps), "mean_gap": sum(gaps) / len(gaps),
            "max_gap": max(gaps)}


def compare_with_reference(checkpoint: str, prompts: list, dtype: str, new_tokens: int, decode=None) -> dict:
    """{"vllm": stats, "reference": stats}: vLLM's greedy tokens and the reference's own greedy tokens at `dtype`
    (CPU), each scored by the fp32 reference (KV4 simulated, as the checkpoint says)."""
    import torch

    from vllm_qserve.evaluate import load_sim_model

    gens = vllm_generate(checkpoint, prompts, dtype, new_tokens)
    ref32 = load_sim_model(checkpoint, dtype=torch.float32, device="cpu")[0].eval()
    ref16 = load_sim_model(checkpoint, dtype=getattr(torch, dtype), device="cpu")[0].eval()
    stats = {}
    for name in ("vllm", "reference"):
        gaps = []
        for p, (prompt, gen) in enumerate(zip(prompts, gens)):
            assert len(gen["token_ids"]) == new_tokens, f"prompt {p}: {len(gen['token_ids'])} tokens generated"
            tokens = gen["token_ids"] if name == "vllm" else greedy(ref16, prompt, new_tokens)
            gaps += fp32_gaps(ref32, prompt, tokens)
            if decode is not None:
                print(f"{name}, prompt {p}: {decode(tokens)!r}")
        stats[name] = summarize(gaps)
    print(f"against the fp32 reference ({dtype} reference = the noise floor): {stats}")
    return stats


def assert_follows_reference(stats: dict, agreement_margin: float, min_agreement: float, gap_factor: float,
                             gap_slack: float, max_mean_gap: float) -> None:
    ours, floor = stats["vllm"], stats["reference"]
    assert ours["agreement"] >= max(floor["agreement"] - agreement_margin, min_agreement), stats
    assert ours["mean_gap"] <= min(gap_factor * floor["mean_gap"] + gap_slack, max_mean_gap), stats
