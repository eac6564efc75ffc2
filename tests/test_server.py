"""`vllm serve` on a QServe fixture checkpoint answers the OpenAI API and shuts down cleanly."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fixture_ckpt, tmp_path_factory):
    model_dir, _, _ = fixture_ckpt(group_size=-1)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    vllm_bin = shutil.which("vllm", path=os.path.dirname(sys.executable)) or "vllm"
    cmd = [vllm_bin, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
           "--enforce-eager", "--served-model-name", "tiny-qserve"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{open(log_path).read()[-5000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"vllm serve did not become healthy:\n{open(log_path).read()[-5000:]}")
    yield proc, port, log_path
    if proc.poll() is None:
        proc.kill()


def test_completions_and_chat(server):
    from openai import OpenAI

    proc, port, log_path = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-qserve"]
    c = client.completions.create(model="tiny-qserve", prompt="Hello world! How", max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 6
    again = client.completions.create(model="tiny-qserve", prompt="Hello world! How", max_tokens=6, temperature=0)
    assert again.choices[0].text == c.choices[0].text  # greedy is deterministic
    chat = client.chat.completions.create(model="tiny-qserve", messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 5
    log = open(log_path).read()
    assert "qserve" in log and "torch-reference kernel" in log, "the plugin's kernel choice is not in the log"


def test_clean_shutdown(server):
    proc, _, log_path = server
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("vllm serve did not exit within 60 s of SIGINT")
    assert code == 0, f"vllm serve exited with {code}:\n{open(log_path).read()[-3000:]}"
