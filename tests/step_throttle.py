"""A vLLM logits processor for tests that must catch requests mid-flight: a request that asks for it
(`vllm_xargs={"step_delay_ms": N}` in an OpenAI request, SamplingParams.extra_args in Python) makes every engine
step that samples for it sleep N ms.  It leaves the logits untouched.

Why: the fault test (tests/test_reliability.py) fills the server with long streams and then aborts them in
stages.  Without a floor on a step's duration, how long a stream lives depends on the machine (a fast CPU, or a
slow API-server process on a loaded one, let the streams run to their end before the test's stages were over),
so the test failed on speed rather than on behaviour.  With the floor a stream of T tokens lives at least
T * N ms on any machine.

Load it with `--logits-processors tests.step_throttle:StepThrottle` (the repository root on PYTHONPATH).
"""

from __future__ import annotations

import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

KEY = "step_delay_ms"


class StepThrottle(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params):
        delay = (sampling_params.extra_args or {}).get(KEY)
        if delay is not None and not (isinstance(delay, (int, float)) and 0 <= delay <= 1000):
            raise ValueError(f"{KEY} must be a number of milliseconds in [0, 1000], got {delay!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.delay_s_by_index: dict[int, float] = {}

    def is_argmax_invariant(self) -> bool:
        # False so that vLLM calls apply() on greedy batches too (argmax-invariant processors are skipped there)
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.delay_s_by_index.pop(index, None)
        for index, params, _, _ in batch_update.added:
            delay = (params.extra_args or {}).get(KEY) if params is not None else None
            if delay:
                self.delay_s_by_index[index] = float(delay) / 1000.0
            else:
                self.delay_s_by_index.pop(index, None)
        for a, b, direction in batch_update.moved:
            da, db = self.delay_s_by_index.pop(a, None), self.delay_s_by_index.pop(b, None)
            if da is not None:
                self.delay_s_by_index[b] = da
            if direction == MoveDirectionality.SWAP and db is not None:
                self.delay_s_by_index[a] = db

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.delay_s_by_index:
            time.sleep(max(self.delay_s_by_index.values()))
        return logits
