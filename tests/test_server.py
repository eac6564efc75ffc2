"""`vllm serve` on a QServe fixture checkpoint answers the OpenAI API and shuts down cleanly."""

import os
import re
import signal
import subprocess

import pytest

from tests.vllm_server import VllmServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(fixture_ckpt, tmp_path_factory):
    model_dir, _, _ = fixture_ckpt(group_size=-1)
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = VllmServer(model_dir, log_path, ["--max-model-len", "256", "--enforce-eager"],
                     served_model_name="tiny-qserve")
    yield srv.proc, srv.port, log_path
    srv.kill()


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
    assert "qserve" in log and re.search(r"run on the (torch-reference|cuda-int8-mma|cuda-int8-wgmma-sm90) kernel",
                                         log), \
        "the plugin's kernel choice is not in the log"


def test_clean_shutdown(server):
    proc, _, log_path = server
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("vllm serve did not exit within 60 s of SIGINT")
    assert code == 0, f"vllm serve exited with {code}:\n{open(log_path).read()[-3000:]}"
