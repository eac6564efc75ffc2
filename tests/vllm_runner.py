"""Runs one vLLM engine in its own process and prints JSON results (tests compare them to a reference).

    python tests/vllm_runner.py '{"model": DIR, "dtype": "float32", "prompts": [[ids...]], "max_tokens": 8, ...}'
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    preemptions = [0]
    if args.get("count_preemptions"):
        # vLLM 0.26's LLM.get_metrics() has no preemption counter: run the engine in this process and count the
        # scheduler's own preemptions.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.v1.core.sched.scheduler import Scheduler

        _preempt = Scheduler._preempt_request

        def counting_preempt(self, *a, **kw):
            preemptions[0] += 1
            return _preempt(self, *a, **kw)

        Scheduler._preempt_request = counting_preempt
    from vllm import LLM, SamplingParams

    llm_kwargs = dict(model=args["model"], dtype=args.get("dtype", "float32"), max_model_len=256, seed=0,
                      enforce_eager=args.get("enforce_eager", True), skip_tokenizer_init=True)
    if args.get("tensor_parallel_size", 1) > 1:
        llm_kwargs["tensor_parallel_size"] = args["tensor_parallel_size"]
    if args.get("quantization"):
        llm_kwargs["quantization"] = args["quantization"]
    llm_kwargs.update(args.get("engine_kwargs", {}))  # e.g. kv_cache_dtype, enable_prefix_caching, block_size
    # A GPU shared with other jobs (e.g. an accuracy run beside the tests): a smaller share of its memory.
    if os.environ.get("VLLM_QSERVE_TEST_GPU_MEMORY_UTILIZATION") and "gpu_memory_utilization" not in llm_kwargs:
        llm_kwargs["gpu_memory_utilization"] = float(os.environ["VLLM_QSERVE_TEST_GPU_MEMORY_UTILIZATION"])
    if args.get("metrics"):
        llm_kwargs["disable_log_stats"] = False
    llm = LLM(**llm_kwargs)
    params = SamplingParams(max_tokens=args.get("max_tokens", 8), temperature=0, logprobs=args.get("logprobs", 3),
                            ignore_eos=True, detokenize=False)
    rounds = []
    for _ in range(args.get("rounds", 1)):  # a second round of the same prompts hits the prefix cache
        outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append({"token_ids": list(c.token_ids),
                           "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]})
        rounds.append(result)
    payload = {"generations": rounds[-1], "rounds": rounds, "preemptions": preemptions[0]}
    if args.get("metrics"):
        values = {}
        for m in llm.get_metrics():
            if m.name in args["metrics"]:
                values[m.name] = values.get(m.name, 0) + getattr(m, "value", 0)
        payload["metrics"] = values
    if args.get("probe_linears"):
        import functools

        from tests.engine_probe import probe_linears

        llm.apply_model(functools.partial(probe_linears, path=args["probe_linears"]))
        payload["probe_path"] = args["probe_linears"]
    if args.get("fusion_log"):
        import functools

        from tests.fusion_probe import dump_fusion_log

        llm.apply_model(functools.partial(dump_fusion_log, path=args["fusion_log"]))
        with open(args["fusion_log"]) as f:
            payload["fusion"] = json.load(f)
    print("RESULT_JSON " + json.dumps(payload), flush=True)
