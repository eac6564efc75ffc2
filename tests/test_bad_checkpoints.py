"""Every kind of bad checkpoint gets an error that names the problem, before any kernel runs."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from vllm_qserve.checkpoint import CheckpointError, inspect_checkpoint
from vllm_qserve.config import QServeConfig
from vllm_qserve.precision import parse_precision

Q = "model.layers.0.self_attn.q_proj"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _tamper(fixture_ckpt, tmp_path, edit, group_size=-1):
    src, _, _ = fixture_ckpt(group_size=group_size)
    d = _copy(src, tmp_path / "bad")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return d


def _inspect(d):
    return inspect_checkpoint(d, AutoConfig.from_pretrained(d))


def test_good_checkpoints_pass(fixture_ckpt):
    for gs in (-1, 128):
        d, _, _ = fixture_ckpt(group_size=gs)
        info = _inspect(d)
        assert (info.weight_bits, info.group_size) == (4, gs)
    d, _, _ = fixture_ckpt(weight_bits=8)
    assert _inspect(d).weight_bits == 8


def test_missing_tensor(fixture_ckpt, tmp_path):
    d = _tamper(fixture_ckpt, tmp_path, lambda t: t.pop(f"{Q}.s1_scales"))
    with pytest.raises(CheckpointError, match=rf"missing tensor {Q}\.s1_scales"):
        _inspect(d)


def test_wrong_dtype(fixture_ckpt, tmp_path):
    d = _tamper(fixture_ckpt, tmp_path, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].half()}))
    with pytest.raises(CheckpointError, match=rf"{Q}\.qweight has dtype torch.float16, expected torch.int8"):
        _inspect(d)


def test_wrong_shape(fixture_ckpt, tmp_path):
    d = _tamper(fixture_ckpt, tmp_path, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :64].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{Q}\.qweight has shape \[256, 64\], expected \[256, 128\]"):
        _inspect(d)


def _edit_config(d, **changes):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_output_dim_not_multiple_of_32(fixture_ckpt, tmp_path):
    d = _copy(fixture_ckpt(group_size=-1)[0], tmp_path / "bad")
    _edit_config(d, intermediate_size=520)
    with pytest.raises(CheckpointError, match="output dim 520 is not a multiple of 32"):
        _inspect(d)


def test_input_dim_not_multiple_of_128_in_group_mode(fixture_ckpt, tmp_path):
    d = _copy(fixture_ckpt(group_size=128)[0], tmp_path / "bad")
    _edit_config(d, intermediate_size=544)  # multiple of 32, not of 128: down_proj input
    with pytest.raises(CheckpointError, match="input dim 544 is not a multiple of 128"):
        _inspect(d)


def test_mixed_group_sizes(fixture_ckpt, tmp_path):
    def mix(t):
        t.pop(f"{Q}.s1_szeros")
        t[f"{Q}.s2_scales"] = torch.ones(2, 256, dtype=torch.int8)
        t[f"{Q}.s2_zeros"] = torch.zeros(2, 256, dtype=torch.int8)

    d = _tamper(fixture_ckpt, tmp_path, mix)
    with pytest.raises(CheckpointError, match="mixed quantization modes"):
        _inspect(d)


def test_quantization_config_contradicts_tensors(fixture_ckpt):
    d, _, _ = fixture_ckpt(group_size=-1)
    cfg = QServeConfig.from_config({"quant_method": "qserve", "group_size": 128})
    with pytest.raises(CheckpointError, match="quantization_config says group_size=128 but the checkpoint's tensors"):
        cfg.maybe_update_config(d, AutoConfig.from_pretrained(d))


def test_unsupported_precision_and_group_size():
    with pytest.raises(ValueError, match="unsupported QServe precision 'w3a8kv4'"):
        parse_precision("w3a8kv4")
    with pytest.raises(ValueError, match="unsupported QServe precision"):
        QServeConfig.from_config({"quant_method": "qserve", "precision": "w4a4"})
    with pytest.raises(ValueError, match="unsupported QServe group size 64"):
        QServeConfig.from_config({"quant_method": "qserve", "group_size": 64})
    with pytest.raises(ValueError, match="W8A8 QServe checkpoints are per-channel only"):
        QServeConfig.from_config({"quant_method": "qserve", "precision": "w8a8kv4", "group_size": 128})


def test_non_llama_layer_names(fixture_ckpt, tmp_path):
    def rename(t):
        for k in [k for k in t if k.startswith("model.layers.1.mlp.")]:
            t[k.replace("model.layers.1.mlp.", "transformer.h.1.ffn.")] = t.pop(k)

    d = _tamper(fixture_ckpt, tmp_path, rename)
    with pytest.raises(CheckpointError, match="does not follow Llama-style layer names"):
        _inspect(d)


def test_truncated_safetensors(fixture_ckpt, tmp_path):
    d = _copy(fixture_ckpt(group_size=-1)[0], tmp_path / "bad")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _inspect(d)


def test_truncated_bin(fixture_ckpt, tmp_path):
    d = _copy(fixture_ckpt(group_size=-1, fmt="bin", zoo_style=True)[0], tmp_path / "bad")
    path = os.path.join(d, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _inspect(d)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qserve-pwned",))


def test_bin_with_pickled_object_is_refused_without_running_it(fixture_ckpt, tmp_path):
    d = _copy(fixture_ckpt(group_size=-1, fmt="bin", zoo_style=True)[0], tmp_path / "bad")
    state = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    state["model.layers.0.extra"] = _Payload()
    torch.save(state, os.path.join(d, "pytorch_model.bin"))
    if os.path.exists("/tmp/qserve-pwned"):
        os.remove("/tmp/qserve-pwned")
    with pytest.raises(CheckpointError, match="refused to load: the file holds pickled objects other than tensors"):
        _inspect(d)
    assert not os.path.exists("/tmp/qserve-pwned")


def test_zoo_bin_detected_from_tensors(fixture_ckpt):
    d, _, _ = fixture_ckpt(group_size=128, fmt="bin", zoo_style=True)
    assert "quantization_config" not in json.load(open(os.path.join(d, "config.json")))
    cfg = QServeConfig()  # what `--quantization qserve` builds for a checkpoint with no quantization_config
    cfg.maybe_update_config(d, AutoConfig.from_pretrained(d))
    assert (cfg.weight_bits, cfg.group_size) == (4, 128)


@pytest.mark.slow
def test_error_reaches_the_vllm_user(fixture_ckpt, tmp_path):
    """Through `vllm.LLM`, the checkpoint error is what the user sees (vLLM wraps it in its config validation
    error), before any engine process starts."""
    from vllm import LLM

    d = _tamper(fixture_ckpt, tmp_path, lambda t: t.pop(f"{Q}.s1_szeros"))
    with pytest.raises(Exception, match=rf"missing tensor {Q}\.s1_szeros \(W4A8 per-channel layout"):
        LLM(model=d, max_model_len=128, enforce_eager=True)


# --- safetensors headers that lie about where the bytes are -------------------------------------------------------
# vLLM memory-maps safetensors files and hands every tensor's bytes to the weight loader (and from there to the
# kernels); a header whose offsets overlap, leave holes, disagree with the shape or run past the file must be
# refused while the header is all that has been read.

L0, L1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"


def _edit_header(fixture_ckpt, tmp_path, edit):
    """Copy of the fixture whose model.safetensors header went through edit(header) (the data bytes unchanged)."""
    import struct

    d = _copy(fixture_ckpt(group_size=-1)[0], tmp_path / "bad")
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header = edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return d


def _set(name, **fields):
    def edit(h):
        h[name].update(fields)
        return h

    return edit


def test_safetensors_offsets_overlap(fixture_ckpt, tmp_path):
    """Two tensors pointing at the same bytes: each loads fine alone, so only the header check can see it."""
    def edit(h):
        h[f"{L1}.s1_scales"]["data_offsets"] = h[f"{L0}.s1_scales"]["data_offsets"]
        return h

    d = _edit_header(fixture_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.[01]\.self_attn\.q_proj\.s1_scales \(bytes \[\d+, "
                                              r"\d+\)\) overlaps tensor .*the header is corrupt"):
        _inspect(d)


def test_safetensors_offsets_past_the_end(fixture_ckpt, tmp_path):
    def edit(h):
        start, end = h[f"{L0}.qweight"]["data_offsets"]
        h[f"{L0}.qweight"]["data_offsets"] = [start + 10**9, end + 10**9]
        return h

    d = _edit_header(fixture_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"{L0}\.qweight has data offsets \[\d+, \d+\) that run past the end "
                                              r"of the file \(\d+ data bytes\)"):
        _inspect(d)


def test_safetensors_offsets_disagree_with_shape(fixture_ckpt, tmp_path):
    d = _edit_header(fixture_ckpt, tmp_path, _set(f"{L0}.s1_scales", shape=[512]))
    with pytest.raises(CheckpointError, match=rf"{L0}\.s1_scales has data offsets \[\d+, \d+\) \(512 bytes\) but "
                                              r"shape \[512\] and dtype F16 need 1024 bytes"):
        _inspect(d)


def test_safetensors_dtype_changed_in_header(fixture_ckpt, tmp_path):
    """fp16 scales relabelled as int8 in the header: the byte count no longer matches the shape."""
    d = _edit_header(fixture_ckpt, tmp_path, _set(f"{L0}.s1_scales", dtype="I8"))
    with pytest.raises(CheckpointError, match=rf"{L0}\.s1_scales has data offsets .* \(512 bytes\) but shape "
                                              r"\[256\] and dtype I8 need 256 bytes"):
        _inspect(d)


def test_safetensors_hole_in_the_data(fixture_ckpt, tmp_path):
    def edit(h):
        del h[f"{L0}.s1_szeros"]
        return h

    d = _edit_header(fixture_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"bytes \[\d+, \d+\) before tensor .* belong to no tensor|the tensors "
                                              r"end at data byte \d+ but the file holds \d+"):
        _inspect(d)


@pytest.mark.parametrize("bad", [[], {"x": {"dtype": "F16", "shape": [2]}}, {"x": {"dtype": "F16", "shape": [-2],
                                 "data_offsets": [0, 4]}}, {"x": {"dtype": "F16", "shape": [2],
                                                                  "data_offsets": [0, "4"]}}],
                         ids=["not-an-object", "no-offsets", "negative-dim", "string-offset"])
def test_safetensors_malformed_header_entries(fixture_ckpt, tmp_path, bad):
    d = _edit_header(fixture_ckpt, tmp_path, lambda h: bad)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        _inspect(d)


# --- through vLLM: the error comes from config creation, before an engine process, a weight load or a kernel -----

def _engine_config(d, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=d, max_model_len=128, enforce_eager=True, **kw).create_engine_config()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["overlap", "wrong-dtype"])
def test_vllm_refuses_bad_safetensors_before_loading(fixture_ckpt, tmp_path, case):
    """EngineArgs.create_engine_config() is the step before vLLM starts its engine process (which is where weights
    are read and kernels run): the checkpoint error must come out of it."""
    if case == "overlap":
        def edit(h):
            h[f"{L1}.s1_scales"]["data_offsets"] = h[f"{L0}.s1_scales"]["data_offsets"]
            return h

        d, expect = _edit_header(fixture_ckpt, tmp_path, edit), "overlaps tensor"
    else:
        d = _tamper(fixture_ckpt, tmp_path, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}))
        expect = rf"{Q}\.qweight has dtype torch.float32, expected torch.int8"
    with pytest.raises(Exception, match=expect):
        _engine_config(d)


@pytest.mark.slow
def test_vllm_refuses_pickle_payload_without_running_it(fixture_ckpt, tmp_path):
    """`--quantization qserve` on a zoo-style .bin that carries a code-executing pickle: refused at config
    creation and the payload never runs."""
    d = _copy(fixture_ckpt(group_size=-1, fmt="bin", zoo_style=True)[0], tmp_path / "bad")
    state = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    marker = tmp_path / "pwned"
    state["model.layers.0.extra"] = _Marker(str(marker))
    torch.save(state, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(Exception, match="refused to load: the file holds pickled objects other than tensors"):
        _engine_config(d, quantization="qserve")
    assert not marker.exists(), "the pickle payload ran"


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# --- key centres (quantize --key-center; vllm_qserve/attention/key_center_method.py) ---------------------------

def _with_key_centers(fixture_ckpt, tmp_path, edit=None, declare=True):
    src, _, _ = fixture_ckpt(group_size=-1)
    d = _copy(src, tmp_path / "centred")
    cfg = json.load(open(os.path.join(d, "config.json")))
    n = cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    for i in range(cfg["num_hidden_layers"]):
        tensors[f"model.layers.{i}.self_attn.attn.k_center"] = torch.randn(n)
    if edit:
        edit(tensors)
    save_file(tensors, path)
    if declare:
        cfg["quantization_config"]["key_center"] = True
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


def test_key_centers_declared_and_present_pass(fixture_ckpt, tmp_path):
    _inspect(_with_key_centers(fixture_ckpt, tmp_path))


@pytest.mark.parametrize("case,fragment", [
    ("undeclared", "does not declare key_center"),
    ("missing", "missing model.layers.1.self_attn.attn.k_center"),
    ("shape", "a key centre is a float"),
])
def test_bad_key_centers(fixture_ckpt, tmp_path, case, fragment):
    edits = {"missing": lambda t: t.pop("model.layers.1.self_attn.attn.k_center"),
             "shape": lambda t: t.update({"model.layers.0.self_attn.attn.k_center": torch.zeros(3)})}
    d = _with_key_centers(fixture_ckpt, tmp_path, edits.get(case), declare=case != "undeclared")
    with pytest.raises(CheckpointError, match=fragment):
        _inspect(d)


def test_cuda_kv_kernel_never_drops_a_key_centre_on_decodes():
    """The CUDA decode kernel does not add the centre, so the builder routes every request of a key-centred
    checkpoint the prefill way; a decode batch reaching attend with a centre is refused, not served uncentred."""
    from types import SimpleNamespace

    from vllm_qserve.attention.kernels import CudaKVKernel, KVSpec

    kernel = CudaKVKernel.__new__(CudaKVKernel)  # no __init__: it binds FlashAttention, absent on CPU
    kernel.spec = KVSpec(8, 2, 128, 4, torch.float16, "cuda", key_center=True)
    q = torch.zeros(1, 8, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="key-centred layer got decode requests"):
        kernel.attend(q, None, SimpleNamespace(num_decodes=1), 1.0, torch.empty_like(q), key_center=object())
