"""The end-to-end benchmark harness (issue 5): model folders, dummy QServe weights, results file, one tiny run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from vllm_qserve.benchmark import configs as bc
from vllm_qserve.benchmark import throughput as bt

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, hidden_size=256,
            intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
            hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16")

# Published architecture numbers (the models' Hugging Face config.json files).
PUBLISHED = {
    "llama-3-8b": ("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 500000.0),
    "llama-2-7b": ("LlamaForCausalLM", 32000, 4096, 11008, 32, 32, 32, 10000.0),
    "mistral-7b": ("MistralForCausalLM", 32768, 4096, 14336, 32, 32, 8, 1000000.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_folders_hold_the_published_architectures(name):
    with open(os.path.join(bc.resolve_model(name), "config.json")) as f:
        c = json.load(f)
    got = (c["architectures"][0], c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
           c["num_attention_heads"], c["num_key_value_heads"], c["rope_theta"])
    assert got == PUBLISHED[name]
    assert c["torch_dtype"] == "bfloat16" and "quantization_config" not in c
    assert c.get("sliding_window") is None  # the KV4/KV8 backend refuses sliding windows


@pytest.mark.parametrize("name,bits,group,kv", [("w4a8kv4-pc", 4, -1, 4), ("w4a8kv4-g128", 4, 128, 4),
                                                ("w4a8kv8-pc", 4, -1, 8), ("w4a8kv16-pc", 4, -1, 16),
                                                ("w8a8kv4", 8, -1, 4), ("w4a8kv4-pc-kc", 4, -1, 4)])
def test_qserve_folders_declare_what_the_plugin_parses(tmp_path, name, bits, group, kv):
    from vllm_qserve.config import QServeConfig

    d = bc.write_model_folder(bc.resolve_model("llama-3-8b"), bc.CONFIGS[name], str(tmp_path))
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    q = QServeConfig.from_config(c["quantization_config"])
    assert QServeConfig.override_quantization_method(c["quantization_config"], None) == "qserve"
    assert (q.weight_bits, q.group_size, q.kv_bits) == (bits, group, kv)
    assert q.key_center == name.endswith("-kc")
    assert c["hidden_size"] == 4096 and os.listdir(d) == ["config.json"]


def test_baseline_folders_and_config_names(tmp_path):
    c = json.load(open(os.path.join(bc.write_model_folder(bc.resolve_model("llama-2-7b"), bc.CONFIGS["bf16"],
                                                          str(tmp_path / "bf16")), "config.json")))
    assert "quantization_config" not in c
    c = json.load(open(os.path.join(bc.write_model_folder(bc.resolve_model("llama-2-7b"), bc.CONFIGS["marlin-w4a16"],
                                                          str(tmp_path / "m")), "config.json")))
    assert c["quantization_config"]["quant_method"] == "gptq" and c["quantization_config"]["bits"] == 4
    assert bc.CONFIGS["fp8"].engine_kwargs == {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    assert [c.name for c in bc.parse_configs("all")] == list(bc.DEFAULT_CONFIGS)
    with pytest.raises(ValueError, match="unknown configuration.*w4a4"):
        bc.parse_configs("fp8,w4a4")
    with pytest.raises(ValueError, match="no-such-model"):
        bc.resolve_model("no-such-model")


# --- dummy weights ------------------------------------------------------------------------------------------------
def _garbage_layer(n, k, weight_bits, group_size):
    """The parameters QServeLinearMethod creates, holding what vLLM's dummy loader leaves: junk and +-1e-3."""
    layer = torch.nn.Module()
    junk = lambda *shape: torch.full(shape, -77, dtype=torch.int8)  # noqa: E731
    p = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    if weight_bits == 8:
        layer.weight, layer.dequant_scale = p(junk(n, k)), p(torch.full((n,), -1e-3, dtype=torch.float16))
        return layer
    layer.qweight = p(junk(n, k // 2))
    layer.s1_scales = p(torch.full((n,), -1e-3, dtype=torch.float16))
    if group_size == -1:
        layer.s1_szeros = p(torch.full((n,), -1e-3, dtype=torch.float16))
    else:
        layer.s2_scales, layer.s2_zeros = p(junk(k // group_size, n)), p(junk(k // group_size, n))
    return layer


def _dequantized(layer, weight_bits, group_size):
    from vllm_qserve.packing import unpack_w4
    from vllm_qserve.reference.gemm import rebuild_w8_per_group

    if weight_bits == 8:
        return layer.weight.float() * layer.dequant_scale.float()[:, None]
    if group_size == -1:
        return unpack_w4(layer.qweight).float() * layer.s1_scales.float()[:, None] - layer.s1_szeros.float()[:, None]
    w8 = rebuild_w8_per_group(layer.qweight, layer.s2_scales, layer.s2_zeros).float()
    return w8 * layer.s1_scales.float()[:, None]


@pytest.mark.parametrize("weight_bits,group_size", [(4, -1), (4, 128), (8, -1)])
def test_dummy_qserve_weights_are_valid(weight_bits, group_size):
    from vllm_qserve.dummy_weights import TARGET_WEIGHT_STD, fill_dummy_qserve_weights
    from vllm_qserve.packing import unpack_w4, unpermute_s2

    n, k = 96, 640
    layer = _garbage_layer(n, k, weight_bits, group_size)
    fill_dummy_qserve_weights(layer, weight_bits, group_size, k, "model.layers.3.mlp.down_proj")
    if weight_bits == 8:
        assert int(layer.weight.min()) >= -127 and bool((layer.dequant_scale.float() > 0).all())
    else:
        s1 = layer.s1_scales.float()
        assert bool(torch.isfinite(s1).all()) and bool((s1 > 0).all())
        q = unpack_w4(layer.qweight)
        assert q.unique().numel() == 16  # every code occurs: random, not a constant byte
        if group_size == -1:
            z = layer.s1_szeros.float() / s1
            assert bool(((z - 7).abs() < 0.02).logical_or((z - 8).abs() < 0.02).all())
        else:
            s2 = unpermute_s2(layer.s2_scales).long()  # [K/128, N] in channel order
            zs = -unpermute_s2(layer.s2_zeros).long()  # z * s2 up to the byte wrap
            zs = torch.where(zs < 0, zs + 256, zs)
            assert int(s2.min()) >= 1 and int(s2.max()) <= 8
            assert bool((zs % s2 == 0).all())
            z = zs // s2
            assert int(z.min()) >= 0 and int(z.max()) <= 15
            # the kernel's byte arithmetic: q * s2 <= 255 and (q - z) * s2 inside int8, for every code it may meet
            s2_full = s2.t().repeat_interleave(group_size, dim=1)
            z_full = z.t().repeat_interleave(group_size, dim=1)
            assert int((q.long() * s2_full).max()) <= 255
            w8 = (q.long() - z_full) * s2_full
            assert int(w8.min()) >= -128 and int(w8.max()) <= 127
    w = _dequantized(layer, weight_bits, group_size)
    assert bool(torch.isfinite(w).all())
    std = float(w.std()) * math.sqrt(k)
    assert 0.6 * TARGET_WEIGHT_STD < std < 1.6 * TARGET_WEIGHT_STD
    # repeatable per layer name, different across layers
    again = _garbage_layer(n, k, weight_bits, group_size)
    fill_dummy_qserve_weights(again, weight_bits, group_size, k, "model.layers.3.mlp.down_proj")
    other = _garbage_layer(n, k, weight_bits, group_size)
    fill_dummy_qserve_weights(other, weight_bits, group_size, k, "model.layers.4.mlp.down_proj")
    for (name, a), b, c in zip(layer.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(layer.s1_scales if weight_bits == 4 else layer.dequant_scale,
                           other.s1_scales if weight_bits == 4 else other.dequant_scale)


# --- results file and report ---------------------------------------------------------------------------------
def _rec(config, batch, tok_s, mode="throughput"):
    return dict(model="m", config=config, mode=mode, batch=batch, input_len=1024, output_len=512, output_tok_s=tok_s,
                fits_in_kv_cache=True, kv_cache_tokens=500000, preemptions=0, engine_start_s=80.0, gpu="H100",
                vllm_version="0.26.0", torch_version="2.11", latency_s=1.0, ms_per_output_token=2.0)


def test_results_resume_and_report(tmp_path):
    out = str(tmp_path / "r.json")
    for r in (_rec("fp8", 256, 10000.0), _rec("fp8", 512, 11000.0), _rec("w4a8kv4-pc", 256, 16500.0),
              _rec("bf16", 256, 7000.0), _rec("w4a8kv4-pc", 256, 15000.0), _rec("fp8", 1, 100.0, "latency")):
        bt.add_record(out, r)
    recs = bt.load_results(out)["records"]
    assert len(recs) == 5  # the repeated (w4a8kv4-pc, 256) replaced the first
    args = bt.build_parser().parse_args(["--configs", "w4a8kv4-pc,fp8", "--batches", "256,512", "--mode",
                                         "throughput,latency", "--latency-batches", "1"])
    args.model = "m"
    plan = {c.name: todo for c, todo in bt.plan_jobs(args, bc.parse_configs(args.configs), bt.done_keys(out))}
    assert plan == {"w4a8kv4-pc": [["throughput", 512], ["latency", 1]], "fp8": []}
    table = bt.markdown_table(recs, "m", 1024, 512)
    row = next(line for line in table.splitlines() if line.startswith("| w4a8kv4-pc"))
    assert "15,000 (256)" in row and "1.36x" in row and "2.14x" in row  # vs fp8's best (B=512) and bf16
    assert "| fp8 | 1 | 1.00 | 2.00 |" in table
    png = bt.plot_best(recs, "m", 1024, 512, str(tmp_path / "p.png"))
    if png:  # matplotlib present
        assert os.path.getsize(png) > 1000


@pytest.mark.slow
def test_tiny_end_to_end_run_on_cpu(tmp_path):
    """bench_throughput through vLLM on a tiny Llama with dummy QServe g128 weights (valid codes, finite logits)."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "res.json"
    # the engine in the worker's own process: one process start less (CI time)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_throughput.py"), "--model", str(model), "--configs",
           "w4a8kv4-g128", "--batches", "2", "--input-len", "8", "--output-len", "8", "--enforce-eager",
           "--warmup-requests", "2", "--dtype", "bfloat16", "--out", str(out), "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (rec,) = json.loads(out.read_text())["records"]
    assert (rec["model"], rec["config"], rec["batch"], rec["mode"]) == ("tiny", "w4a8kv4-g128", 2, "throughput")
    assert rec["warmup_logprobs_finite"] and rec["kv_cache_dtype"] == "int4_per_token_head"
    assert rec["output_tok_s"] > 0 and rec["preemptions"] == 0 and rec["fits_in_kv_cache"]
    assert "| w4a8kv4-g128 |" in proc.stdout
    # a second run finds everything measured and starts no engine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "already in" in proc.stdout


# --- profile classification --------------------------------------------------------------------------------------
def test_kernel_classification_and_busy_time():
    from vllm_qserve.benchmark.kernel_classes import classify, summarize_events

    cases = {
        "void qgemm_kernel<(Mode)0, Cfg<32, 64>>(GemmParams)": "gemm-qserve",
        "void fused_quant::fused_quant_kernel<__nv_bfloat16, 8, (fused_quant::Prologue)2>(Params, bool)":
            "silu-mul(+quant)",
        "void fused_quant::fused_quant_kernel<__nv_bfloat16, 8, (fused_quant::Prologue)1>(Params, bool)":
            "norm(+quant)",
        "void kv_decode_kernel<128, 4, 8>(DecodeParams)": "attention",
        "void flash::FlashAttnFwdSm90<cutlass::bfloat16_t, 128>(Params)": "attention",
        "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>": "attention",
        "void vllm::rotary_embedding_kernel<c10::BFloat16, true>": "rotary",
        "void per_token_quant_kernel<c10::BFloat16>(...)": "act-quant",
        "void vllm::dynamic_per_token_scaled_fp8_quant_kernel<c10::BFloat16>": "act-quant",
        "void cutlass::device_kernel<cutlass3x_sm90_tensorop_s64x128x32gemm_e4m3>": "gemm-vendor",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "gemm-vendor",
        "void qserve::gemm_sm90::w4a8_wgmma_ws_kernel<(qserve::gemm_sm90::Mode)0, qserve::gemm_sm90::WsConfig<128, 5>, "
        "__nv_bfloat16>(CUtensorMap_st, qserve::gemm::GemmParams)": "gemm-qserve",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm(+quant)",
        "triton_poi_fused_mul_silu_slice_1": "silu-mul(+quant)",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "sampling/logits",
        "void at::native::vectorized_elementwise_kernel<4, AddFunctor>": "other",
    }
    for name, cat in cases.items():
        assert classify(name) == cat, name
    ev = lambda name, ts, dur, cat="kernel": {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [ev("void qgemm_kernel<0>", 0, 100), ev("void kv_decode_kernel<128,4,8>", 50, 100),  # overlap 50
              ev("Memcpy HtoD", 300, 10, "gpu_memcpy"), ev("void qgemm_kernel<0>", 400, 100),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]
    s = summarize_events(events, steps=2)
    assert s["category_ms_per_step"]["gemm-qserve"] == 0.1 and s["category_ms_per_step"]["attention"] == 0.05
    assert s["kernel_ms_per_step"] == 0.155 and s["gpu_busy_ms_per_step"] == 0.13  # (150 + 10 + 100) / 2 us
    assert s["top_kernels"][0] == {"name": "void qgemm_kernel<0>", "category": "gemm-qserve", "ms_per_step": 0.1,
                                   "launches_per_step": 1.0}
    # the host side: runtime calls and CPU ops per step, biggest first; kernels are not host work
    from vllm_qserve.benchmark.kernel_classes import summarize_host

    events += [ev("cudaGraphLaunch", 0, 40, "cuda_runtime"), ev("cudaGraphLaunch", 500, 60, "cuda_runtime"),
               ev("cudaLaunchKernel", 10, 6, "cuda_runtime"), ev("my_step", 0, 2000, "user_annotation")]
    h = summarize_host(events, steps=2)
    assert h["runtime_calls"] == [{"name": "cudaGraphLaunch", "calls_per_step": 1.0, "ms_per_step": 0.05},
                                  {"name": "cudaLaunchKernel", "calls_per_step": 0.5, "ms_per_step": 0.003}]
    assert [o["name"] for o in h["cpu_ops"]] == ["my_step", "aten::mm"] and h["cpu_ops"][1]["ms_per_step"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_bits,group_size", [(4, -1), (4, 128), (8, -1)])
def test_dummy_weights_on_the_gpu_through_the_cuda_kernels(weight_bits, group_size):
    """Filled on the device (as in an engine) and consumed by our CUDA GEMMs: equal to the reference bit for bit,
    finite, and a unit-variance input comes out with std ~TARGET_WEIGHT_STD (neither blowing up nor vanishing)."""
    from vllm_qserve import ops
    from vllm_qserve.dummy_weights import TARGET_WEIGHT_STD, fill_dummy_qserve_weights
    from vllm_qserve.reference import gemm as ref_gemm

    if not ops.HAS_CUDA_OPS:
        pytest.skip("vllm_qserve._C is not built")
    n, k = 6144, 4096
    layer = _garbage_layer(n, k, weight_bits, group_size).cuda()
    fill_dummy_qserve_weights(layer, weight_bits, group_size, k, "model.layers.0.self_attn.qkv_proj")
    x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
    per_channel = weight_bits == 4 and group_size == -1
    xq, sx, xsum = torch.ops.qserve.quantize_per_token(x, per_channel)
    if weight_bits == 8:
        y = torch.ops.qserve.w8a8_gemm(xq, sx, layer.weight, layer.dequant_scale, None, x.dtype)
        ref = ref_gemm.w8a8(xq, sx, layer.weight, layer.dequant_scale, x.dtype)
    elif per_channel:
        y = torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xsum, layer.qweight, layer.s1_scales, layer.s1_szeros,
                                                   None, x.dtype)
        ref = ref_gemm.w4a8_per_channel(xq, sx, xsum, layer.qweight, layer.s1_scales, layer.s1_szeros, x.dtype)
    else:
        y = torch.ops.qserve.w4a8_gemm_per_group(xq, sx, layer.qweight, layer.s1_scales, layer.s2_scales,
                                                 layer.s2_zeros, None, x.dtype)
        ref = ref_gemm.w4a8_per_group(xq, sx, layer.qweight, layer.s1_scales, layer.s2_scales, layer.s2_zeros,
                                      x.dtype)
    assert bool(torch.isfinite(y).all())
    assert torch.equal(y, ref)
    assert 0.5 * TARGET_WEIGHT_STD < float(y.float().std()) < 2 * TARGET_WEIGHT_STD


def test_serving_report_table_and_plot(tmp_path, capsys):
    """`bench_serving --report-only` prints the markdown table and writes the PNG from a results JSON."""
    pytest.importorskip("matplotlib")
    from vllm_qserve.benchmark import serving as bs

    out = tmp_path / "serving.json"
    rec = {"model": "llama-3-8b", "input_len": 1024, "output_len": 512, "requests": 128, "gpu": "test-gpu",
           "ttft_ms_p99": 1000.0, "tpot_ms_p99": 9.0}
    records = [dict(rec, config=c, concurrency=k, output_tok_s=t, ttft_ms_median=f, tpot_ms_median=p)
               for c, k, t, f, p in (("w4a8kv4-pc", 16, 3000.0, 300.0, 5.0), ("w4a8kv4-pc", 64, 7680.0, 515.0, 7.2),
                                     ("fp8", 64, 6964.0, 376.0, 8.2))]
    out.write_text(json.dumps({"protocol": "test", "runs": [], "records": records}))
    assert bs.main(["--report-only", "--model", "llama-3-8b", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| w4a8kv4-pc | 64 | 128 | 7,680 |" in text and "| fp8 | 64 |" in text, text
    png = tmp_path / "serving_llama-3-8b.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
