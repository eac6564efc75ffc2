"""The load generator's checks catch what they claim to (no vLLM here): a fake OpenAI server answers the generated
workload correctly except for faults injected into chosen requests, and exactly those requests must be reported,
each for its own fault."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.load_generator import format_table, load_test, make_workload, percentile

FAULTS = {  # request index -> fault the fake server injects (indices chosen by kind below)
}


class _Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # SSE streams end when the connection closes
    seen_ids = {}
    replays = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        idx = int(re.match(r"Request (\d+):", prompt).group(1))
        with self.lock:
            self.replays[idx] = self.replays.get(idx, 0) + 1
            replay = self.replays[idx] > 1
        fault = FAULTS.get(idx)
        if fault == "http500":
            return self._send(500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
        n, max_tokens = body.get("n", 1), body["max_tokens"]
        rid = f"cmpl-{idx}-{int(replay)}" if fault != "duplicate-id" else "cmpl-shared"
        count = max_tokens - 1 if fault == "short" else max_tokens
        toks = [f" t{(idx * 7 + i) % 13}" for i in range(count)]
        if fault == "nondeterministic" and replay:
            toks = toks[::-1]
        choices = list(range(n - 1 if fault == "missing-choice" else n))
        lp = body.get("logprobs")
        top = body.get("top_logprobs", 0) if chat else lp
        usage = {"prompt_tokens": 5, "completion_tokens": n * max_tokens, "total_tokens": 5 + n * max_tokens}

        def logprobs(part):
            if lp is None or lp is False:
                return None
            value = 0.5 if fault == "positive-logprob" else -0.25
            if chat:
                return {"content": [{"token": t, "logprob": value, "bytes": None,
                                     "top_logprobs": [{"token": t, "logprob": -0.25, "bytes": None}] * top}
                                    for t in part]}
            return {"tokens": part, "token_logprobs": [value] * len(part),
                    "top_logprobs": [{t: -0.25} for t in part], "text_offset": [0] * len(part)}

        def choice(i, part, finish):
            piece = "".join(part)
            if (body.get("echo") or fault == "wrong-echo") and not body.get("stream"):
                piece = (prompt if fault != "wrong-echo" else "Request 99999: someone else's prompt") + piece
            if chat:
                key = "delta" if body.get("stream") else "message"
                return {"index": i, key: {"role": "assistant", "content": piece}, "finish_reason": finish,
                        "logprobs": logprobs(part)}
            return {"index": i, "text": piece, "finish_reason": finish, "logprobs": logprobs(part)}

        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            return self._send(200, {"id": rid, "object": obj, "created": 0, "model": body["model"],
                                    "choices": [choice(i, toks, "length") for i in choices],
                                    "usage": None if fault == "no-usage" else usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        obj += ".chunk"
        for i in choices:
            events = [(toks[: len(toks) // 2], None), (toks[len(toks) // 2:], "length")]
            if fault == "chunk-after-finish":
                events.append(([" extra"], None))
            for part, finish in events:
                chunk = {"id": rid if fault != "two-stream-ids" or finish is None else rid + "x", "object": obj,
                         "created": 0, "model": body["model"], "choices": [choice(i, part, finish)]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if fault != "no-usage":
            last = {"id": rid, "object": obj, "created": 0, "model": body["model"], "choices": [], "usage": usage}
            self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status, payload):
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog of 5 refuses a burst of concurrent clients
    daemon_threads = True


@pytest.fixture
def fake_server():
    srv = _Server(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _pick(specs, taken, **want):
    for s in specs:
        if s.idx not in taken and all(getattr(s, k) == v if not callable(v) else v(getattr(s, k))
                                      for k, v in want.items()):
            taken.add(s.idx)
            return s.idx
    raise AssertionError(f"the workload has no request with {want}")


def test_each_injected_fault_is_reported_for_its_request(fake_server):
    specs = make_workload(200, seed=0)
    taken = set()
    greedy = lambda t: t == 0  # noqa: E731
    injected = {
        _pick(specs, taken, stream=False): ("http500", "HTTP 500"),
        _pick(specs, taken, stream=False, endpoint="completions"): ("duplicate-id", "(duplicated)"),
        _pick(specs, taken, stream=False, endpoint="completions"): ("duplicate-id", "(duplicated)"),
        _pick(specs, taken, stream=False, logprobs=lambda v: v is not None, ignore_eos=False): (
            "short", "finish_reason length after"),
        _pick(specs, taken, temperature=greedy): ("nondeterministic", "under load"),
        _pick(specs, taken, echo=True): ("wrong-echo", "does not start with this request's prompt"),
        _pick(specs, taken, n=lambda v: v > 1, stream=False): ("missing-choice", "choice indices"),
        _pick(specs, taken, stream=True): ("chunk-after-finish", "chunk after its finish_reason"),
        _pick(specs, taken, stream=True): ("two-stream-ids", "stream carried 2 response ids"),
        _pick(specs, taken, stream=False, endpoint="chat"): ("no-usage", "no usage in the response"),
        _pick(specs, taken, logprobs=lambda v: v is not None): ("positive-logprob", "log-probability 0.5"),
    }
    FAULTS.clear()
    FAULTS.update({i: f for i, (f, _) in injected.items()})
    _Fake.replays.clear()
    try:
        summary = load_test(fake_server, "fake", num_requests=200, concurrency=32, seed=0, progress=False)
    finally:
        FAULTS.clear()
    problems = summary["problems"]
    for idx, (fault, fragment) in injected.items():
        mine = [p for p in problems if re.search(rf"request {idx}\b", p)]
        assert any(fragment in p for p in mine), f"{fault} in request {idx} not reported: {mine}"
    reported = {int(m) for p in problems for m in re.findall(r"requests? (\d+)", p)}
    assert reported <= set(injected), f"clean requests reported: {sorted(reported - set(injected))}"
    assert summary["answered"] == 199 and summary["errors"] == {"HTTP 500": 1}
    assert summary["greedy_mismatches"] + summary["seeded_mismatches"] >= 1
    print("\n" + format_table(summary))


def test_clean_run_has_no_problems(fake_server):
    FAULTS.clear()
    _Fake.replays.clear()
    summary = load_test(fake_server, "fake", num_requests=40, concurrency=40, seed=1, progress=False)
    assert summary["problems"] == [] and summary["answered"] == 40 and summary["lost_or_duplicated"] == 0


def test_workload_is_seeded_and_mixed():
    a, b = make_workload(200, seed=0), make_workload(200, seed=0)
    assert a == b and make_workload(200, seed=1) != a
    assert len({s.prompt for s in a}) == 200  # unique prompts: answers cannot be swapped unnoticed
    kinds = {s.kind for s in a}
    assert {"completions/full/greedy", "completions/stream/seeded", "chat/stream/greedy", "chat/full/seeded"} <= kinds
    assert any(s.n > 1 for s in a) and any(s.logprobs is not None for s in a) and any(s.echo for s in a)
    assert any(s.top_k is not None for s in a) and any(s.ignore_eos for s in a)


def test_percentile_is_nearest_rank():
    v = list(range(1, 101))
    assert (percentile(v, 50), percentile(v, 99), percentile(v, 100)) == (50, 99, 100)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_near_tie_rule():
    from tests.load_generator import RequestSpec, compare_choice

    greedy = RequestSpec(0, "completions", False, "p", 3)
    seeded = RequestSpec(0, "completions", False, "p", 3, temperature=1.0, seed=5)

    def run(*steps):  # (token, logprob, {alternative: logprob})
        return list(steps)

    a = run(("t:1", -1.0, {"t:1": -1.0, "t:2": -1.1}), ("t:3", -2.0, {"t:3": -2.0, "t:4": -2.05}))
    same = run(("t:1", -1.0, {"t:1": -1.0}), ("t:3", -2.0, {"t:3": -2.0}))
    tie = run(("t:1", -1.02, {"t:1": -1.02}), ("t:4", -2.04, {"t:4": -2.04, "t:3": -2.06}))
    no_tie = run(("t:1", -1.0, {"t:1": -1.0}), ("t:9", -1.5, {"t:9": -1.5, "t:3": -2.5}))
    drift = run(("t:1", -1.6, {"t:1": -1.6}), ("t:4", -2.0, {"t:4": -2.0, "t:3": -2.01}))
    assert compare_choice(greedy, a, same, "", "", 0.0) == ("same", 0.0)
    assert compare_choice(greedy, a, tie, "", "", 0.0)[0] == "differs"  # tolerance 0: identical tokens only
    assert compare_choice(greedy, a, tie, "", "", 0.3)[0] == "near-tie"
    assert compare_choice(greedy, a, no_tie, "", "", 0.3)[0] == "differs"  # t:9 is not in the reference's top
    assert compare_choice(greedy, a, drift, "", "", 0.3)[0] == "differs"  # 0.6 nats apart before diverging
    assert compare_choice(seeded, a, no_tie, "", "", 0.3)[0] == "near-tie"  # sampled: only the prefix must agree
    assert compare_choice(greedy, a, a[:1], "", "", 0.3)[0] == "differs"  # one token short
    assert compare_choice(greedy, None, None, "x", "y", 0.3)[0] == "differs"  # no token data: the text decides
    assert compare_choice(greedy, a, run(a[0], ("t:3", -2.5, {})), "", "", 0.3)[0] == "differs"


# --- the step throttle the fault test relies on (tests/step_throttle.py) ---------------------------------------

def test_step_throttle_follows_the_batch_and_sleeps_only_for_requests_that_ask():
    import time

    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from tests.step_throttle import StepThrottle

    def update(size, removed=(), added=(), moved=()):
        return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))

    slow, plain = SamplingParams(extra_args={"step_delay_ms": 30}), SamplingParams()
    t = StepThrottle(None, "cpu", False)
    assert not t.is_argmax_invariant(), "vLLM would skip apply() on greedy batches"
    logits = torch.randn(3, 7)
    before = logits.clone()
    t.update_state(update(2, added=[(0, plain, [1], []), (1, slow, [2], [])]))
    assert t.delay_s_by_index == {1: 0.03}
    t0 = time.perf_counter()
    assert t.apply(logits) is logits and torch.equal(logits, before)
    assert time.perf_counter() - t0 >= 0.03
    t.update_state(update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert t.delay_s_by_index == {0: 0.03}
    t.update_state(update(2, moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))  # the plain one replaces it
    assert t.delay_s_by_index == {}
    t.update_state(update(1, added=[(0, slow, [3], [])]))
    t.update_state(update(0, removed=[0]))
    assert t.delay_s_by_index == {}
    t0 = time.perf_counter()
    t.apply(logits)
    assert time.perf_counter() - t0 < 0.02, "slept with no throttled request in the batch"
    with pytest.raises(ValueError, match="step_delay_ms"):
        StepThrottle.validate_params(SamplingParams(extra_args={"step_delay_ms": "fast"}))
