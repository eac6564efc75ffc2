"""Runs inside vLLM's worker (LLM.apply_model): reports what the QServe fusion pass did in this process and which
model runner / CUDA-graph mode compiled the model (results travel back through a JSON file)."""

import json
import sys


def dump_fusion_log(model, path):
    from vllm_qserve.fusion.inductor_pass import REPLACEMENT_LOG

    runner, cudagraph_mode = None, None
    frame = sys._getframe(1)
    while frame is not None:  # the worker that called apply_model holds the model runner and the config
        owner = frame.f_locals.get("self")
        if owner is not None and hasattr(owner, "model_runner"):
            r = owner.model_runner
            runner = f"{type(r).__module__}.{type(r).__name__}"
            cfg = getattr(owner, "vllm_config", None) or getattr(r, "vllm_config", None)
            if cfg is not None:
                cudagraph_mode = str(cfg.compilation_config.cudagraph_mode)
            break
        frame = frame.f_back
    with open(path, "w") as f:
        json.dump({"log": REPLACEMENT_LOG, "runner": runner, "cudagraph_mode": cudagraph_mode}, f)
    return len(REPLACEMENT_LOG)
