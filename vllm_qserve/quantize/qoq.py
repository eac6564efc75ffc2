"""The QoQ recipe (QServe paper, arXiv 2405.04532), layer by layer, ending in QServe checkpoint tensors.

    1. rotate     fold RMSNorm gains, Hadamard-rotate the residual stream and each head's V / o_proj input
    then for each decoder layer, on the calibration hidden states that the already-quantized layers produce:
    2. observe    one fp pass of the layer: keys after RoPE (max), inputs of o_proj and down_proj (max, a token
                  sample), X^T X of the four distinct projection inputs
    3. SmoothAttention   lambda = max|K|^0.5 per RoPE pair and KV head into q/k rows (exact)
    4. smooth     v -> o and up -> down, SmoothQuant scales s = max|x|^a / max|w|^(1-a), a searched on a grid
                  (no smoothing among the candidates) by the simulated W4A8 output error of o_proj / down_proj
    5. reorder    group 128: intermediate channels sorted by activation size (gate/up rows, down columns)
    6. quantize   per-channel: per-row clipping ratio searched by simulated output error, then GPTQ (act-order);
                  group 128: GPTQ with progressive grids (protective range [-119, 119]); W8: clipping + GPTQ
    7. propagate  the layer with QServe numerics (quantized weights, int8 activations, simulated KV4/KV8) turns
                  the calibration states into the next layer's input

Every statistic of a transformed input is derived exactly from the observed one (X/s, X[:, perm], their X^T X),
so a layer costs two passes over the calibration tokens.  Steps 1, 3, 4 and 5 are exact re-parametrisations
(tests/test_quantize_transforms.py checks the logits before quantization).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from vllm_qserve.checkpoint import key_center_name
from vllm_qserve.quantize import transforms as T
from vllm_qserve.quantize.gptq import Hessian, gptq, single_thread
from vllm_qserve.quantize.model import CausalLM, DecoderLayer
from vllm_qserve.quantize.quantizers import make_quantizer
from vllm_qserve.quantize.simulate import act_terms, kv_fake_quant, sim_linear_from_tensors, sim_matmul
from vllm_qserve.reference.activation import check_activation_sum

SMOOTH_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)  # round-to-nearest (no GPTQ) search
GPTQ_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
# Projections quantized together: they read the same input, so they share X^T X.
GROUPS = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}


@dataclass
class QoQOptions:
    weight_bits: int = 4
    group_size: int = -1
    kv_bits: int = 4
    rotate: bool = True
    rotate_heads: bool = True
    smooth_attention: bool = True
    key_center: bool = False  # store each layer's mean pre-RoPE key; KV4 caches RoPE(k - m) (reference/key_center.py)
    # per-channel W4A8's activation sum the checkpoint is made for (reference/activation.py): "quantized" makes the
    # GEMM exactly x_hat . W; "input" is QServe's own kernels' sum (docs/accuracy.md measures both)
    activation_sum: str = "quantized"
    smooth_attention_alpha: float | None = None  # None: searched per layer (SMOOTH_ATTENTION_ALPHAS)
    smooth_v_o: bool = True
    smooth_up_down: bool = True
    smooth_inputs: bool | None = None  # q/k/v and gate/up inputs into the norm gains; default: where not rotated
    reorder: bool | None = None  # default: on for group 128
    clip_search: bool | None = None  # default: on for per-channel grids
    use_gptq: bool = True
    gptq_damp: float = 0.01
    search_tokens: int = 1024  # token sample for the smoothing / clipping searches
    batch_size: int = 8  # calibration sequences per forward
    seed: int = 0
    log: dict = field(default_factory=dict)

    def __post_init__(self):
        check_activation_sum(self.activation_sum)
        if self.reorder is None:
            self.reorder = self.group_size == 128
        if self.clip_search is None:
            self.clip_search = self.group_size == -1


class _Observer:
    """Statistics of one fp pass of a decoder layer (hooks on its modules)."""

    def __init__(self, layer: DecoderLayer, sample_idx: torch.Tensor, key_mean: bool = False):
        self.layer = layer
        self.sample_idx = sample_idx  # flat token indices (over all calibration tokens) kept for searches
        self.offset = 0  # flat index of the current batch's first token
        a = layer.self_attn.arch
        h, inter = a.hidden_size, a.intermediate_size
        self.hess = {"qkv": Hessian(h), "o": Hessian(a.num_heads * a.head_dim), "gate_up": Hessian(h),
                     "down": Hessian(inter)}
        self.absmax = {}
        self.samples = {name: [] for name in GROUPS}
        self.key_absmax = None
        self._hooks = []
        for name, (part, projs) in GROUPS.items():
            mod = getattr(getattr(layer, part), projs[0])
            self._hooks.append(mod.register_forward_pre_hook(self._input_hook(name)))
        layer.self_attn.qk_observer = self._qk_observer
        self.q_samples, self.k_samples = [], []
        self.key_sum, self.key_count = None, 0  # pre-RoPE keys (k_proj output, bias included): their mean
        if key_mean:
            self._hooks.append(layer.self_attn.k_proj.register_forward_hook(self._key_hook))

    def _key_hook(self, _mod, _args, out):
        k = out.detach().reshape(-1, out.shape[-1]).double()
        self.key_sum = k.sum(0) if self.key_sum is None else self.key_sum + k.sum(0)
        self.key_count += k.shape[0]

    def _input_hook(self, name):
        def hook(_mod, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1])
            self.hess[name].add(x2)
            m = x2.abs().amax(0).double()
            self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
            lo, hi = self.offset, self.offset + x2.shape[0]
            sel = self.sample_idx[(self.sample_idx >= lo) & (self.sample_idx < hi)] - lo
            if sel.numel():
                self.samples[name].append(x2[sel].clone())

        return hook

    def _qk_observer(self, q, k):
        """max |key| [Hkv, D]; sampled queries [n, H, D] and keys [n, Hkv, D] (after RoPE; SmoothAttention)."""
        m = k.detach().abs().amax(dim=(0, 2)).double()
        self.key_absmax = m if self.key_absmax is None else torch.maximum(self.key_absmax, m)
        b, _, t, _ = q.shape
        lo, hi = self.offset, self.offset + b * t
        sel = self.sample_idx[(self.sample_idx >= lo) & (self.sample_idx < hi)] - lo
        if sel.numel():
            self.q_samples.append(q.detach().permute(0, 2, 1, 3).reshape(b * t, q.shape[1], -1)[sel].clone())
            self.k_samples.append(k.detach().permute(0, 2, 1, 3).reshape(b * t, k.shape[1], -1)[sel].clone())

    def close(self):
        for h in self._hooks:
            h.remove()
        self.layer.self_attn.qk_observer = None
        self.samples = {k: torch.cat(v) if v else None for k, v in self.samples.items()}
        self.q_samples = torch.cat(self.q_samples) if self.q_samples else None
        self.k_samples = torch.cat(self.k_samples) if self.k_samples else None


SMOOTH_ATTENTION_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def _search_smooth_attention(q: torch.Tensor, k: torch.Tensor, key_absmax: torch.Tensor, bits: int,
                             group: int) -> tuple:
    """SmoothAttention's alpha by the error of the attention logits q . k when keys are cached in `bits`:
    sum over sampled query/key pairs and heads of (q' . (quant(k') - k'))^2, q' = q * lambda, k' = k / lambda."""
    from vllm_qserve.reference.kv import dequantize_kv, quantize_kv

    q, k = q.float(), k.float()
    errors = {}
    for alpha in SMOOTH_ATTENTION_ALPHAS:
        lam = T.smooth_attention_scale(key_absmax, alpha).float()  # [Hkv, D]
        ks = k / lam
        dk = dequantize_kv(*quantize_kv(ks, bits)) - ks  # [n, Hkv, D]
        qs = q * lam.repeat_interleave(group, dim=0)  # [n, H, D]
        dk_h = dk.repeat_interleave(group, dim=1)  # [n, H, D]
        err = torch.einsum("nhd,mhd->hnm", qs, dk_h).pow(2).sum()
        errors[alpha] = float(err)
    best = min(errors, key=errors.get)
    return best, errors


def _rtn_terms(w: torch.Tensor, opts: QoQOptions, ratio=1.0) -> tuple:
    """(dequantized weight, s1_szeros or None) of round-to-nearest on the grid of opts."""
    q = make_quantizer(opts.weight_bits, opts.group_size)
    q.prepare(w, ratio)
    _, deq = q.rtn(w)
    return deq, q.szeros()


def _search_smoothing(x: torch.Tensor, w: torch.Tensor, act_absmax: torch.Tensor, w_absmax: torch.Tensor,
                      expand, opts: QoQOptions) -> tuple:
    """Best smoothing scale among the alphas (and none) by simulated W4A8 output error on the token sample x:
    (s or None, alpha or None, {alpha: error})."""
    x, w = x.float(), w.float()
    ref = x @ w.t()
    errors = {}
    best = (None, None, float("inf"))
    with single_thread():
        for alpha in (None,) + SMOOTH_ALPHAS:
            s = None if alpha is None else T.smoothing_scale(act_absmax, w_absmax, alpha)
            se = x.new_ones(x.shape[1]) if s is None else expand(s).to(x)
            xs = x / se
            y = sim_matmul(*act_terms(xs, opts.activation_sum), *_rtn_terms(w * se, opts))
            err = float((y - ref).double().pow(2).sum())
            errors[alpha] = err
            if err < best[2]:
                best = (s, alpha, err)
    return best[0], best[1], errors


def _clip_ratios(x: torch.Tensor, w: torch.Tensor, opts: QoQOptions) -> torch.Tensor:
    """Per-row clipping ratio minimising the simulated output error on the token sample x."""
    x, w = x.float(), w.float()
    ref = x @ w.t()
    x_hat, xsum_err = act_terms(x, opts.activation_sum)
    best_err, best_r = None, None
    for r in CLIP_RATIOS:
        y = sim_matmul(x_hat, xsum_err, *_rtn_terms(w, opts, r))
        err = (y - ref).double().pow(2).sum(0)  # per output row
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(err, r), best_r)
    return best_r.float()


def _gptq_clip_search(w: torch.Tensor, hess: torch.Tensor, opts: QoQOptions) -> tuple:
    """GPTQ at several clipping ratios; each row keeps the ratio with the least output error tr(D H D^T).

    Rows are independent in GPTQ (same H, own grid), so the candidates run as one GPTQ over the stacked rows and
    mixing rows of different ratios is exact.  Measured on SmolLM2: clipping chosen by round-to-nearest error
    (0.8-0.9) made GPTQ worse than no clipping at all; chosen with GPTQ in the loop it helps.
    """
    n = w.shape[0]
    ratios = torch.tensor(GPTQ_CLIP_RATIOS, dtype=w.dtype, device=w.device)
    stacked = w.repeat(len(GPTQ_CLIP_RATIOS), 1)
    q = make_quantizer(opts.weight_bits, opts.group_size)
    q.prepare(stacked, ratios.repeat_interleave(n))
    codes, deq = gptq(stacked, hess, q, damp=opts.gptq_damp, act_order=opts.group_size == -1)
    d = deq - stacked
    err = ((d @ hess.to(d.dtype)) * d).sum(1).view(len(GPTQ_CLIP_RATIOS), n)
    best = err.argmin(0)
    rows = torch.arange(n, device=w.device)
    return ratios[best], codes.view(len(GPTQ_CLIP_RATIOS), n, -1)[best, rows]


def _quantize_group(layer: DecoderLayer, name: str, hess: torch.Tensor, sample: torch.Tensor | None,
                    opts: QoQOptions, prefix: str, out: dict) -> dict:
    part, projs = GROUPS[name]
    parent = getattr(layer, part)
    mods = [getattr(parent, p) for p in projs]
    w = torch.cat([m.weight.data for m in mods]).float()
    q = make_quantizer(opts.weight_bits, opts.group_size)
    act_order = opts.group_size == -1
    ratio = 1.0
    if opts.use_gptq and opts.clip_search:
        ratio, codes = _gptq_clip_search(w, hess, opts)
        q.prepare(w, ratio)
    elif opts.use_gptq:
        q.prepare(w)
        codes, _ = gptq(w, hess, q, damp=opts.gptq_damp, act_order=act_order)
    else:
        if opts.clip_search and sample is not None:
            ratio = _clip_ratios(sample, w, opts)
        q.prepare(w, ratio)
        codes, _ = q.rtn(w)
    tensors = q.tensors(codes)
    stats = {"clip_mean": float(torch.as_tensor(ratio, dtype=torch.float64).mean())}
    row = 0
    dtype = mods[0].weight.dtype
    for proj, mod in zip(projs, mods):
        n = mod.weight.shape[0]
        t = _split_rows(tensors, row, n)
        row += n
        for suffix, v in t.items():
            out[f"{prefix}.{part}.{proj}.{suffix}"] = v.contiguous()
        if mod.bias is not None:
            out[f"{prefix}.{part}.{proj}.bias"] = mod.bias.data.to(torch.float16).contiguous()
        setattr(parent, proj, sim_linear_from_tensors(t, mod.bias, dtype, activation_sum=opts.activation_sum))
    return stats


def _split_rows(tensors: dict, start: int, n: int) -> dict:
    """Rows [start, start+n) of a projection group's tensors (32-row tiles and 32-blocks of s2 stay whole)."""
    out = {}
    for k, v in tensors.items():
        if k in ("s2_scales", "s2_zeros"):
            out[k] = v[:, start:start + n]
        else:
            out[k] = v[start:start + n]
    return out


def _run_layer(layer: DecoderLayer, h: torch.Tensor, cos, sin, batch: int, observer: _Observer | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | None:
    for b0 in range(0, h.shape[0], batch):
        hb = h[b0:b0 + batch]
        if observer is not None:
            observer.offset = b0 * h.shape[1]
        y = layer(hb, cos[: hb.shape[0]], sin[: hb.shape[0]])
        if out is not None:
            out[b0:b0 + batch] = y
    return out


@torch.no_grad()
def quantize_qoq(model: CausalLM, calib: torch.Tensor, opts: QoQOptions) -> dict:
    """Runs QoQ on model (in place) with calibration ids [S, L]; returns the QServe projection tensors."""
    t0 = time.perf_counter()
    a = model.arch
    if a.gemma and opts.rotate:
        # not exact across Gemma's post-norms (transforms.py, docs/quantizer.md): the q/k/v and gate/up inputs are
        # smoothed into the norm gains instead
        opts.rotate = False
        opts.log["rotate"] = "skipped: the residual rotation is not exact for Gemma's sandwich norms"
    if opts.key_center:
        if a.gemma:
            raise ValueError("--key-center: Gemma 3 applies QK-norm before RoPE and two RoPE tables; key centring "
                             "is supported for Llama, Qwen2 and Mistral")
        if opts.kv_bits >= 16:
            raise ValueError("--key-center only matters for a quantized KV cache (--kv-bits 4 or 8)")
        if opts.smooth_attention:
            # measured (docs/accuracy.md): centring alone beats centring + SmoothAttention on Qwen2.5 and SmolLM2
            opts.smooth_attention = False
            opts.log["smooth_attention"] = "skipped: key centring takes the outlier key channels away instead"
    smooth_inputs = (not opts.rotate) if opts.smooth_inputs is None else opts.smooth_inputs
    opts.smooth_inputs = smooth_inputs
    if opts.rotate:
        T.rotate_residual(model, opts.seed)
    if opts.rotate_heads:
        T.rotate_heads(model, opts.seed)
    dtype = model.lm_head.weight.dtype
    h = model.embed(calib).to(dtype)
    s, length = calib.shape
    pos = torch.arange(length, device=calib.device).expand(min(opts.batch_size, s), -1)
    cos, sin = model.rope(pos, dtype)
    g = torch.Generator().manual_seed(opts.seed)
    n_sample = min(opts.search_tokens, s * length)
    sample_idx = torch.randperm(s * length, generator=g)[:n_sample].to(calib.device)
    key_centers: dict = {}
    kv_hook = kv_fake_quant(opts.kv_bits, key_centers if opts.key_center else None, model.rope) \
        if opts.kv_bits < 16 else None
    tensors: dict = {}
    log = opts.log.setdefault("layers", [])
    for i, layer in enumerate(tqdm(model.layers, desc="QoQ layers", unit="layer")):
        prefix = f"model.layers.{i}"
        entry = {"layer": i}
        obs = _Observer(layer, sample_idx, key_mean=opts.key_center)
        _run_layer(layer, h, cos, sin, opts.batch_size, obs)
        obs.close()
        hess = {k: v.h for k, v in obs.hess.items()}
        samples, absmax = obs.samples, obs.absmax
        if opts.key_center:
            m = (obs.key_sum / obs.key_count).float().view(a.num_kv_heads, a.head_dim)
            key_centers[i] = m
            tensors[key_center_name(i)] = m.reshape(-1).cpu()
            entry["key_center_absmax"] = float(m.abs().max())

        if opts.smooth_attention and obs.key_absmax is not None:
            # Gemma: lambda lives in the QK-norm gains, which all heads share
            key_absmax = T.shared_over_heads(obs.key_absmax) if a.gemma else obs.key_absmax
            alpha = opts.smooth_attention_alpha
            if alpha is None:
                alpha, _ = _search_smooth_attention(obs.q_samples, obs.k_samples, key_absmax,
                                                    opts.kv_bits if opts.kv_bits < 16 else 4, a.group)
            lam = T.smooth_attention_scale(key_absmax, alpha)
            T.smooth_attention(layer, lam)
            entry["smooth_attention_alpha"] = alpha
            entry["key_absmax_before"] = float(obs.key_absmax.max())
            entry["key_absmax_after"] = float((obs.key_absmax / lam).max())

        if smooth_inputs:
            for name, norm in (("qkv", layer.input_layernorm), ("gate_up", layer.mlp_input_norm)):
                part, projs = GROUPS[name]
                mods = [getattr(getattr(layer, part), p) for p in projs]
                w = torch.cat([m.weight.data for m in mods])
                s_in, alpha, _ = _search_smoothing(samples[name], w, absmax[name], w.abs().amax(0).double(),
                                                   lambda s_: s_, opts)
                entry[f"smooth_{name}_alpha"] = alpha
                if s_in is not None:
                    T.smooth_norm_input(norm, mods, s_in)
                    hess[name] = obs.hess[name].scaled(s_in)
                    samples[name] = samples[name] / s_in.to(samples[name].dtype)
                    absmax[name] = absmax[name] / s_in

        if opts.smooth_v_o:
            act = absmax["o"].view(a.num_heads, a.head_dim).view(a.num_kv_heads, a.group, a.head_dim).amax(1)
            w_max = T.o_proj_weight_absmax_per_kv_channel(layer).double()

            def expand_o(s_kv):
                return s_kv.repeat_interleave(a.group, dim=0).reshape(-1)

            s_kv, alpha, _ = _search_smoothing(samples["o"], layer.self_attn.o_proj.weight.data, act, w_max,
                                               expand_o, opts)
            entry["smooth_v_o_alpha"] = alpha
            if s_kv is not None:
                T.smooth_v_o(layer, s_kv)
                so = expand_o(s_kv)
                hess["o"] = obs.hess["o"].scaled(so)
                samples["o"] = samples["o"] / so.to(samples["o"].dtype)
                absmax["o"] = absmax["o"] / so

        if opts.smooth_up_down:
            w_max = layer.mlp.down_proj.weight.data.abs().amax(0).double()
            s_mlp, alpha, _ = _search_smoothing(samples["down"], layer.mlp.down_proj.weight.data, absmax["down"],
                                                w_max, lambda s_: s_, opts)
            entry["smooth_up_down_alpha"] = alpha
            if s_mlp is not None:
                T.smooth_up_down(layer, s_mlp)
                hess["down"] = obs.hess["down"].scaled(s_mlp)
                samples["down"] = samples["down"] / s_mlp.to(samples["down"].dtype)
                absmax["down"] = absmax["down"] / s_mlp

        if opts.reorder:
            perm = T.activation_order(absmax["down"])
            T.reorder_down(layer, perm)
            hess["down"] = hess["down"][perm][:, perm]
            samples["down"] = samples["down"][:, perm]

        for name in GROUPS:
            entry[f"clip_{name}"] = _quantize_group(layer, name, hess[name], samples[name], opts, prefix,
                                                    tensors)["clip_mean"]
        del hess, samples, obs

        layer.self_attn.kv_hook = kv_hook
        _run_layer(layer, h, cos, sin, opts.batch_size, out=h)
        layer.self_attn.kv_hook = None
        log.append(entry)
    opts.log["seconds"] = time.perf_counter() - t0
    print(f"[quantize] QoQ done in {opts.log['seconds']:.0f}s", file=sys.stderr)
    return tensors
