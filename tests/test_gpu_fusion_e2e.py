"""The fusion pass in vLLM's default serving mode on the GPU (skipped without one): a QServe fixture checkpoint
through vllm.LLM compiled with CUDA graphs (FULL_AND_PIECEWISE), no flag from the user, in the V1 and the V2
model runner.

Proof that the fused ops run: the pass appends, for every graph Inductor compiles, the qserve ops left in it
(REPLACEMENT_LOG); tests/fusion_probe.py reads that list inside the engine's worker.  vLLM splits the model at
attention, so the pieces of one compile range together hold the whole model; per compile range they must
contain exactly
    rms_norm_quant      1          (layer 0's input norm)
    add_rms_norm_quant  2L - 1     (every other norm in front of a linear; the final norm feeds the LM head)
    silu_mul_quant      L          (every MLP)
    quantize_per_token  L          (o_proj's input: nothing to fuse with)
for the L-layer fixture.  Compile caches are disabled so that every piece is really compiled (an Inductor cache
hit skips the post-grad passes, and identical middle layers would hit).

Numbers: the fused runs are held to the fp32 transformers reference with the fp16 rule of tests/test_gpu_plugin.py
(0.6 nats, near-ties allowed), and to the unfused compiled run and the eager run with the same rule.
"""

import pytest
import torch

from tests.conftest import requires_gpu
from tests.test_gpu_plugin import FP16_TOL

pytestmark = [requires_gpu, pytest.mark.slow]
NO_CACHE = {"VLLM_DISABLE_COMPILE_CACHE": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the last one: apply_model ships the probe to the worker
KINDS = ("rms_norm_quant", "add_rms_norm_quant", "silu_mul_quant", "quantize_per_token")


def expected_counts(layers: int) -> dict:
    return {"rms_norm_quant": 1, "add_rms_norm_quant": 2 * layers - 1, "silu_mul_quant": layers,
            "quantize_per_token": layers}


def per_range(log: list[dict]) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for entry in log:
        t = totals.setdefault(entry["range"], {k: 0 for k in KINDS} | {"graphs": 0})
        for k in KINDS:
            t[k] += entry[k]
        t["graphs"] += 1
    return totals


_RUNS: dict = {}


def run(tmp_path_factory, fixture_ckpt, group_size: int, env: dict, enforce_eager: bool = False,
        activation_sum: str | None = None) -> dict:
    """One vLLM engine run (memoized: the comparison test reuses the V2 per-channel run of the count test)."""
    from tests.test_vllm_cpu_e2e import prompts, run_vllm

    key = (group_size, tuple(sorted(env.items())), enforce_eager, activation_sum)
    if key not in _RUNS:
        ckpt = fixture_ckpt(group_size=group_size) if activation_sum is None else \
            fixture_ckpt(group_size=group_size, activation_sum=activation_sum)
        ps = prompts(ckpt[2].vocab_size, seed=5)
        log = tmp_path_factory.mktemp("fusion") / "fusion.json"
        out = run_vllm(model=ckpt[0], prompts=ps, dtype="float16", enforce_eager=enforce_eager,
                       fusion_log=str(log), env_extra={**NO_CACHE, **env})
        _RUNS[key] = dict(out, ckpt=ckpt, prompts=ps)
    return _RUNS[key]


def check_close(a: list, b: list, tol: float = FP16_TOL, min_compared: int = 1) -> float:
    """Two vLLM runs of the same model: greedy tokens equal until a near-tie, log-probabilities of shared top-k
    tokens within tol.  Near-tie: in at least one of the runs the other run's token is in the top-k within tol
    of the chosen one (with four candidates inside 0.2 nats, as measured on the H100, the other run's top-3 can
    miss a token that is within 0.05 nats in this one)."""
    worst, compared = 0.0, 0
    for ra, rb in zip(a, b):
        for step, (ta, tb) in enumerate(zip(ra["token_ids"], rb["token_ids"])):
            la, lb = ra["logprobs"][step], rb["logprobs"][step]
            if ta != tb:
                tie_a = str(tb) in la and abs(la[str(ta)] - la[str(tb)]) < tol
                tie_b = str(ta) in lb and abs(lb[str(ta)] - lb[str(tb)]) < tol
                assert tie_a or tie_b, f"step {step}: tokens {ta} / {tb} differ, not a near-tie ({la} / {lb})"
                break
            for t in set(la) & set(lb):
                worst = max(worst, abs(la[t] - lb[t]))
            compared += 1
    assert compared >= min_compared, f"only {compared} positions compared"
    assert worst < tol, f"log-probabilities differ by {worst:.3f} nats (tolerance {tol})"
    return worst


@pytest.mark.parametrize("v2,group_size,activation_sum", [(False, -1, None), (True, -1, None), (True, 128, None),
                                                          (True, -1, "quantized")],
                         ids=["v1-runner-per-channel", "v2-runner-per-channel", "v2-runner-g128",
                              "v2-runner-per-channel-quantized-sum"])
def test_fused_ops_run_in_compiled_cuda_graph_mode(fixture_ckpt, tmp_path_factory, v2, group_size, activation_sum):
    """Per-channel W4A8 fuses with sum_mode 1 (QServe's sum of x) or, for activation_sum "quantized", 2 (the sum
    of the quantized x); group 128 with no sum.  The reference follows the checkpoint's activation_sum."""
    from tests.test_vllm_cpu_e2e import check_against_reference

    out = run(tmp_path_factory, fixture_ckpt, group_size, {"VLLM_USE_V2_MODEL_RUNNER": "1" if v2 else "0"},
              activation_sum=activation_sum)
    ckpt, fusion = out["ckpt"], out["fusion"]
    assert fusion["runner"] is not None, "the probe found no model runner"
    is_v2 = ".worker.gpu." in fusion["runner"]  # V2: vllm/v1/worker/gpu/model_runner.py
    assert is_v2 == v2, f"asked for the {'V2' if v2 else 'V1'} runner, got {fusion['runner']}"
    assert fusion["cudagraph_mode"] is not None and "FULL_AND_PIECEWISE" in fusion["cudagraph_mode"], fusion
    totals = per_range(fusion["log"])
    assert totals, "the fusion pass never ran (not installed, or the model was not compiled)"
    for compile_range, counts in totals.items():
        got = {k: counts[k] for k in KINDS}
        assert got == expected_counts(ckpt[2].num_hidden_layers), \
            f"compile range {compile_range}: {counts} ({fusion['log']})"
    check_against_reference(ckpt, out["generations"], out["prompts"], tol=FP16_TOL, min_compared=1)
    print(f"{fusion['runner']}: {totals}")


def test_fused_generations_match_unfused_and_eager(fixture_ckpt, tmp_path_factory):
    from tests.test_vllm_cpu_e2e import check_against_reference

    fused = run(tmp_path_factory, fixture_ckpt, -1, {"VLLM_USE_V2_MODEL_RUNNER": "1"})
    unfused = run(tmp_path_factory, fixture_ckpt, -1, {"VLLM_USE_V2_MODEL_RUNNER": "1",
                                                       "VLLM_QSERVE_DISABLE_FUSION": "1"})
    eager = run(tmp_path_factory, fixture_ckpt, -1, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, enforce_eager=True)
    assert per_range(fused["fusion"]["log"]), "the fused run did not fuse"
    assert unfused["fusion"]["log"] == [], "VLLM_QSERVE_DISABLE_FUSION=1 still installed the pass"
    assert eager["fusion"]["log"] == []  # eager mode compiles nothing: the quantizers run unfused, correctly
    for r in (fused, unfused, eager):
        check_against_reference(r["ckpt"], r["generations"], r["prompts"], tol=FP16_TOL, min_compared=1)
    print("fused vs unfused", check_close(fused["generations"], unfused["generations"]),
          "fused vs eager", check_close(fused["generations"], eager["generations"]))
