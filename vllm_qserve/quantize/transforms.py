"""QoQ's exact re-parametrisations of a decoder model: each one leaves the fp function unchanged.

* ``rotate_residual``: fold every RMSNorm gain into the projections that read the normalised stream, then rotate
  the residual stream by an orthogonal (Hadamard) matrix R: x -> x R.  RMSNorm commutes with R once its gain is
  1, so the embeddings, every reader (q/k/v, gate/up, lm_head: W -> W R) and every writer (o_proj, down_proj:
  W -> R^T W, b -> b R) absorb it.  Outlier channels of the stream are spread over all channels, which is what
  makes per-token int8 activations of the q/k/v and gate/up inputs accurate.
* ``rotate_heads``: the same inside each attention head for V and the o_proj input (v_proj rows, o_proj columns
  per head), spreading outliers of the attention output.  Keys cannot be rotated offline (RoPE sits between).
* ``smooth_attention``: SmoothAttention.  Keys after RoPE have a few large channels that 4-bit KV cache
  quantization cannot represent; k_proj rows are divided by lambda and q_proj rows multiplied by it, so
  q . k is unchanged.  lambda is shared by the two channels of each RoPE pair (RoPE rotates them together, so a
  common factor commutes with it) and by all query heads that read the same KV head.
* ``smooth_v_o``, ``smooth_up_down``: SmoothQuant-style migration of activation outliers into weights where the
  activation is a per-channel linear function of the previous layer's rows: attention output = (softmax
  mixture of) V rows per head, SiLU(gate) * up linear in up's rows.
* ``reorder_down``: permutes the intermediate channels (gate/up rows, down_proj columns) so that channels with
  similar activation size share a 128-wide weight group (group-128 only).

* ``smooth_norm_input``: SmoothQuant between an RMSNorm and the projections that read it: gain /= s, input
  columns *= s.  Exact for any per-channel gain.  This is what the q/k/v and gate/up inputs get where the
  residual stream cannot be rotated (Gemma 3, below).

Gemma 3 (docs/quantizer.md, "Gemma 3"): the residual rotation is *not* exact there.  Gemma normalises each
branch output (post_attention_layernorm, post_feedforward_layernorm) before adding it to the stream, and an
RMSNorm commutes with an orthogonal R only when its gain is uniform; with a per-channel gain g,
RMSNorm_g(o) R != RMSNorm_g(o R) and no linear layer follows the post-norm to absorb R.  So ``rotate_residual``
refuses Gemma and the quantizer smooths the q/k/v and gate/up inputs into the norm gains instead.  The rest is
exact for Gemma: the per-head V / o_proj rotation and v -> o smoothing (V has no norm), up -> down smoothing
(gelu_tanh(gate) * up is linear in up's rows), the group-128 reorder, and SmoothAttention -- but through the
QK-norm gains, not k_proj's rows: k = RMSNorm(k_proj x) over head_dim undoes any scaling of k_proj's rows,
while scaling the k_norm gain by 1/lambda and the q_norm gain by lambda is exact (RoPE commutes with a factor
shared by the two channels of a pair).  The QK-norm gains are shared by all heads, so Gemma's lambda is one
vector over head_dim (the max over KV heads).

All arithmetic is float64 and the results are cast back to the parameter dtype.
"""

from __future__ import annotations

import torch

from vllm_qserve.quantize.hadamard import orthogonal_rotation
from vllm_qserve.quantize.model import CausalLM, DecoderLayer, Linear


def _set(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype).contiguous()


def _rotate_inputs(lin: Linear, rot: torch.Tensor, gain: torch.Tensor | None = None) -> None:
    w = lin.weight.double()
    if gain is not None:
        w = w * gain.double()
    _set(lin.weight, w @ rot)


def _rotate_outputs(lin: Linear, rot: torch.Tensor) -> None:
    _set(lin.weight, rot.t() @ lin.weight.double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.double() @ rot)


def rotate_residual(model: CausalLM, seed: int = 0) -> torch.Tensor:
    """Fold norm gains and rotate the residual stream in place; returns R (float64).  Unties lm_head."""
    if model.arch.gemma:
        raise ValueError("rotate_residual is not exact for Gemma: its post-attention / post-feedforward RMSNorms "
                         "have per-channel gains on the branch outputs, which do not commute with a rotation of "
                         "the residual stream (use smooth_norm_input for the q/k/v and gate/up inputs)")
    # built on the CPU (seeded, reproducible), applied where the model lives
    rot = orthogonal_rotation(model.arch.hidden_size, seed).to(model.model.embed_tokens.weight.device)
    model.untie_lm_head()
    emb = model.model.embed_tokens.weight
    _set(emb, emb.double() @ rot)
    _rotate_inputs(model.lm_head, rot, model.model.norm.weight)
    model.model.norm.weight.data.fill_(1.0)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _rotate_inputs(lin, rot, layer.input_layernorm.weight)
        for lin in (mlp.gate_proj, mlp.up_proj):
            _rotate_inputs(lin, rot, layer.post_attention_layernorm.weight)
        layer.input_layernorm.weight.data.fill_(1.0)
        layer.post_attention_layernorm.weight.data.fill_(1.0)
        _rotate_outputs(attn.o_proj, rot)
        _rotate_outputs(mlp.down_proj, rot)
    return rot


def rotate_heads(model: CausalLM, seed: int = 0) -> torch.Tensor:
    """Per-head rotation of V (v_proj rows, bias) and of the o_proj input columns; returns the head rotation."""
    a = model.arch
    hrot = orthogonal_rotation(a.head_dim, seed).to(model.model.embed_tokens.weight.device)
    for layer in model.layers:
        attn = layer.self_attn
        wv = attn.v_proj.weight.double().view(a.num_kv_heads, a.head_dim, -1)
        _set(attn.v_proj.weight, torch.einsum("de,hdk->hek", hrot, wv).reshape(a.num_kv_heads * a.head_dim, -1))
        if attn.v_proj.bias is not None:
            bv = attn.v_proj.bias.double().view(a.num_kv_heads, a.head_dim)
            _set(attn.v_proj.bias, (bv @ hrot).reshape(-1))
        wo = attn.o_proj.weight.double().view(-1, a.num_heads, a.head_dim)
        _set(attn.o_proj.weight, (wo @ hrot).reshape(-1, a.num_heads * a.head_dim))
    return hrot


def smooth_attention_scale(key_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """lambda [Hkv, D] from max |key| [Hkv, D] after RoPE: max|K|^alpha, equal on both channels of a RoPE pair."""
    hkv, d = key_absmax.shape
    lam = key_absmax.double().clamp(min=1e-5).pow(alpha)
    pair = lam.view(hkv, 2, d // 2).amax(dim=1)  # rotate_half pairs channel c with c + D/2
    return pair.repeat(1, 2)


def smooth_attention(layer: DecoderLayer, lam: torch.Tensor) -> None:
    """q rows *= lambda (repeated over the query heads of each KV group), k rows /= lambda.  lam: [Hkv, D].

    Gemma (QK-norm): the q_norm gain *= lambda and the k_norm gain /= lambda instead; those gains are shared by all
    heads, so lam must be equal for every KV head (use ``shared_over_heads``)."""
    attn = layer.self_attn
    a = attn.arch
    lam = lam.double()
    if a.gemma:
        if not torch.equal(lam, lam[:1].expand_as(lam)):
            raise ValueError("Gemma's SmoothAttention scale must be shared by all KV heads (QK-norm gains are "
                             "per channel of head_dim only)")
        attn.q_norm.set_gain(attn.q_norm.gain * lam[0])
        attn.k_norm.set_gain(attn.k_norm.gain / lam[0])
        return
    lam_q = lam.repeat_interleave(a.group, dim=0).reshape(-1)  # query head h reads KV head h // group
    lam_k = lam.reshape(-1)
    _set(attn.q_proj.weight, attn.q_proj.weight.double() * lam_q[:, None])
    _set(attn.k_proj.weight, attn.k_proj.weight.double() / lam_k[:, None])
    if attn.q_proj.bias is not None:
        _set(attn.q_proj.bias, attn.q_proj.bias.double() * lam_q)
    if attn.k_proj.bias is not None:
        _set(attn.k_proj.bias, attn.k_proj.bias.double() / lam_k)


def shared_over_heads(key_absmax: torch.Tensor) -> torch.Tensor:
    """[Hkv, D] -> the max over KV heads, repeated for every head (Gemma's QK-norm gains are shared by heads)."""
    return key_absmax.amax(0, keepdim=True).expand_as(key_absmax).clone()


def smooth_norm_input(norm, linears, s: torch.Tensor) -> None:
    """SmoothQuant into an RMSNorm's gain: gain /= s, every reader's input column *= s (exact).  s: [hidden]."""
    s = s.double()
    norm.set_gain(norm.gain / s)
    for lin in linears:
        _set(lin.weight, lin.weight.double() * s[None, :])


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|x|^alpha / max|w|^(1 - alpha) per input channel (float64)."""
    act = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    s = act.pow(alpha) / w.pow(1 - alpha)
    return s / s.mean()  # overall level is free; centring it keeps both sides near their original magnitude


def smooth_v_o(layer: DecoderLayer, s: torch.Tensor) -> None:
    """V channel (g, d) /= s[g, d]; o_proj column (h, d) *= s[h // group, d].  s: [Hkv, D]."""
    attn = layer.self_attn
    a = attn.arch
    s = s.double()
    sv = s.reshape(-1)
    so = s.repeat_interleave(a.group, dim=0).reshape(-1)
    _set(attn.v_proj.weight, attn.v_proj.weight.double() / sv[:, None])
    if attn.v_proj.bias is not None:
        _set(attn.v_proj.bias, attn.v_proj.bias.double() / sv)
    _set(attn.o_proj.weight, attn.o_proj.weight.double() * so[None, :])


def o_proj_weight_absmax_per_kv_channel(layer: DecoderLayer) -> torch.Tensor:
    """max |W_o| over output rows and over the query heads sharing each KV channel: [Hkv, D]."""
    a = layer.self_attn.arch
    w = layer.self_attn.o_proj.weight.abs().amax(0).view(a.num_kv_heads, a.group, a.head_dim)
    return w.amax(1)


def smooth_up_down(layer: DecoderLayer, s: torch.Tensor) -> None:
    """up_proj row c /= s[c]; down_proj column c *= s[c] (SiLU(gate) * up is linear in up's rows)."""
    mlp = layer.mlp
    s = s.double()
    _set(mlp.up_proj.weight, mlp.up_proj.weight.double() / s[:, None])
    if mlp.up_proj.bias is not None:
        _set(mlp.up_proj.bias, mlp.up_proj.bias.double() / s)
    _set(mlp.down_proj.weight, mlp.down_proj.weight.double() * s[None, :])


def reorder_down(layer: DecoderLayer, perm: torch.Tensor) -> None:
    """Intermediate channel perm[i] moves to position i: gate/up rows and down_proj columns."""
    mlp = layer.mlp
    for lin in (mlp.gate_proj, mlp.up_proj):
        _set(lin.weight, lin.weight.data[perm])
        if lin.bias is not None:
            _set(lin.bias, lin.bias.data[perm])
    _set(mlp.down_proj.weight, mlp.down_proj.weight.data[:, perm])


def activation_order(act_absmax: torch.Tensor) -> torch.Tensor:
    """Channels by decreasing activation size (stable), so each 128-group holds channels of similar size."""
    return torch.sort(act_absmax.double(), descending=True, stable=True).indices
