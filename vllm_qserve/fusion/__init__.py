"""Activation quantization fused into the op in front of it (RMSNorm, residual add + RMSNorm, SiLU-and-mul).

    fused_ops.py    fake (meta) implementations of torch.ops.qserve.{rms_norm_quant, add_rms_norm_quant,
                    silu_mul_quant} (CUDA kernels: csrc/quant/fused_quant_*.{cu,cpp})
    patterns.py     what the pass looks for in vLLM's post-grad graph and what it puts in its place
    inductor_pass.py QServeFusionPass: the Inductor pattern-matcher pass, its uuid and its replacement log
    install.py      adds the pass to vLLM's PostGradPassManager for QServe models (no user flag)

This package is imported by vllm_qserve.ops (for the fakes), so this file imports nothing heavy.
"""
