"""The server over HTTP on 127.0.0.1: the official openai client, streaming, limits and bad input, the key,
429 and 504, feedback into SQLite and chunks, metrics, a schemathesis run, and a hot swap under load."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import sqlite3
import threading
import time

import httpx
import hypothesis
import pytest

from lm.app import serve as serve_app
from lm.config import load_config
from lm.core.errors import ConfigError
from lm.experiment import load_trained
from tests.serve.conftest import CONFIG, serve_overrides

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "a", "KING HENRY:\nThe", "O", "What say you", "To be, or not"]


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
  """A server on a copy of the trained run (the hot-swap test trains it further), feedback chunks of 2."""
  workdir = tmp_path_factory.mktemp("serving") / "shakespeare"
  shutil.copytree(trained_run, workdir)
  config = load_config(CONFIG, serve_overrides(**{"serve.feedback_chunk_size": 2, "serve.max_tokens": 24}))
  server = serve_app.start_server(config, str(workdir), report=lambda *args: None)
  yield server, config, workdir
  server.stop()


def _post(url: str, body, **kwargs) -> httpx.Response:
  if isinstance(body, bytes):  # JSON written out, e.g. with an escape httpx would not encode
    return httpx.post(url + "/v1/completions", content=body, timeout=60,
                      headers={"content-type": "application/json", **kwargs.pop("headers", {})}, **kwargs)
  return httpx.post(url + "/v1/completions", json=body, timeout=60, **kwargs)


def test_the_openai_client_completes_streams_and_gets_errors(served):
  import openai  # pylint: disable=g-import-not-at-top
  server, _, _ = served
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
  [model] = client.models.list().data
  assert model.id == "shakespeare" and model.version["step"] == 40
  completion = client.completions.create(model=model.id, prompt="ROMEO:", max_tokens=8, temperature=0, n=2,
                                         logprobs=1)
  assert len(completion.choices) == 2 and completion.choices[0].text == completion.choices[1].text
  assert completion.system_fingerprint == "shakespeare@step-40"
  assert len(completion.choices[0].logprobs.tokens) == 8 and completion.choices[0].finish_reason == "length"
  assert all(value <= 0 for value in completion.choices[0].logprobs.token_logprobs)
  streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
      model=model.id, prompt="ROMEO:", max_tokens=8, temperature=0, stream=True) if chunk.choices)
  assert streamed == completion.choices[0].text
  with pytest.raises(openai.BadRequestError, match="max_tokens"):
    client.completions.create(model=model.id, prompt="ROMEO:", max_tokens=10_000)
  with pytest.raises(openai.NotFoundError, match="shakespeare"):
    client.completions.create(model="gpt-9", prompt="ROMEO:", max_tokens=2)


def test_greedy_answers_equal_sample_mode_among_32_concurrent_requests_and_nothing_recompiles(served):
  server, config, workdir = served
  compiled = server.engine.slots_model.compile_counts()
  config = load_config(CONFIG, serve_overrides(**{"sample.temperature": 0.0, "sample.max_tokens": 10}))
  experiment, params, _ = load_trained(config, str(workdir), "sample")
  with experiment.steps.context():
    expected = {prompt: experiment.task.sample(params, config.sample, prompt)[0] for prompt in PROMPTS}
  prompts = (PROMPTS * 5)[:32]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    responses = list(pool.map(lambda prompt: _post(server.url, {"prompt": prompt, "max_tokens": 10,
                                                                "temperature": 0}), prompts))
  assert all(response.status_code == 200 for response in responses)
  texts = [prompt + response.json()["choices"][0]["text"] for prompt, response in zip(prompts, responses)]
  assert texts == [expected[prompt] for prompt in prompts]
  several = _post(server.url, {"prompt": PROMPTS[:3], "max_tokens": 10, "temperature": 0, "n": 2}).json()
  assert [choice["text"] for choice in several["choices"]] == [
      expected[prompt][len(prompt):] for prompt in PROMPTS[:3] for _ in range(2)]
  assert several["choices"][3]["feedback"] == {"id": several["id"] + "/1", "choice": 1}
  assert server.engine.slots_model.compile_counts() == compiled


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "1..24"),
    ({"prompt": "a", "max_tokens": 25}, "max_tokens", "1..24"),
    ({"prompt": "a", "max_tokens": "3"}, "max_tokens", "integer"),
    ({"prompt": "a", "temperature": -1}, "temperature", "0..100"),
    ({"prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_k": -2}, "top_k", ">= 0"),
    ({"prompt": "a", "n": 9}, "n", "1..8"),
    ({"prompt": ["a"] * 5, "n": 8}, "n", "max_batch=32"),
    ({"prompt": "a", "stop": ["x"] * 5}, "stop", "at most 4"),
    ({"prompt": "a", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "0..5"),
    ({"prompt": "a", "best_of": 2}, "best_of", "Unknown field"),
    ({"prompt": []}, "prompt", "empty list"),
    ({"prompt": ""}, "prompt", "no tokens"),
    ({"prompt": "x" * 30, "max_tokens": 10}, "prompt", "at most 23 fit"),
    (b'{"prompt": "caf\\ud800"}', "prompt", "surrogate"),
    ({"prompt": 5}, "prompt", "string"),
    ({"max_tokens": 3}, "prompt", "required"),
    ([1, 2], None, "JSON object"),
])
def test_bad_requests_get_400_naming_the_field(served, body, param, words):
  server, _, _ = served
  response = _post(server.url, body)
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_malformed_json_a_huge_body_and_bad_feedback(served):
  server, _, _ = served
  response = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "a",', timeout=30,
                        headers={"content-type": "application/json"})
  assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
  response = _post(server.url, {"prompt": "a" * 2_000_000})
  assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]
  feedback = lambda body: httpx.post(server.url + "/v1/feedback", json=body, timeout=30)  # noqa: E731
  assert feedback({"id": "cmpl-nope", "rating": 1}).status_code == 404
  done = _post(server.url, {"prompt": "a", "max_tokens": 2}).json()
  assert feedback({"id": done["id"], "rating": 2}).status_code == 400
  assert feedback({"id": done["id"], "choice": 3, "rating": 1}).status_code == 400
  assert feedback({"id": done["id"], "rating": 1, "extra": 1}).status_code == 400


def test_a_full_queue_answers_429_and_a_late_answer_504(served):
  server, _, _ = served
  engine, limits = server.engine, server.service.config
  saved = engine.max_queue, limits.request_timeout
  engine.max_queue = 2
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    try:
      with engine.hold():  # nothing is admitted: requests wait in the queue
        waiting = [pool.submit(_post, server.url, {"prompt": "a", "max_tokens": 3}) for _ in range(2)]
        for _ in range(1000):
          if engine.queue_depth == 2:
            break
          time.sleep(0.01)
        refused = _post(server.url, {"prompt": "a", "max_tokens": 3})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        engine.max_queue, limits.request_timeout = 3, 0.3
        late = _post(server.url, {"prompt": "a", "max_tokens": 3})
        assert late.status_code == 504 and "request_timeout" in late.json()["error"]["message"]
        limits.request_timeout = saved[1]
    finally:
      engine.max_queue, limits.request_timeout = saved
    assert [future.result().status_code for future in waiting] == [200, 200]
  assert _post(server.url, {"prompt": "a", "max_tokens": 3}).status_code == 200  # the timed-out one was skipped


def test_feedback_is_stored_before_the_answer_and_exported_once_as_chunks(served):
  server, _, workdir = served
  first = _post(server.url, {"prompt": "ROMEO:", "max_tokens": 6, "n": 2, "seed": 1}).json()
  database = workdir / "serve" / "feedback.sqlite"
  with sqlite3.connect(database) as db:
    assert db.execute("SELECT prompt FROM completions WHERE id = ?", (first["id"],)).fetchone() == ("ROMEO:",)
  for body in ({"rating": 1}, {"preferred": 1}, {"choice": 1, "correction": "\nGood morrow."},
               {"choice": 1, "rating": -1}):  # 4 records: two chunks of 2
    response = httpx.post(server.url + "/v1/feedback", json={"id": first["id"], **body}, timeout=30)
    assert response.status_code == 200, response.text
  server.exporter.export()  # the exporter thread does this every few seconds (it may have already); here, now
  chunks = workdir / "serve" / "chunks"
  texts = [json.loads(line)["text"] for path in sorted(chunks.glob("*.jsonl"))
           if not path.name.endswith(".preferences.jsonl") for line in path.read_text().splitlines()]
  assert "ROMEO:" + first["choices"][0]["text"] in texts and "ROMEO:\nGood morrow." in texts
  pairs = [json.loads(line) for path in chunks.glob("*.preferences.jsonl") for line in path.read_text().splitlines()]
  assert {"prompt": "ROMEO:", "chosen": first["choices"][1]["text"], "rejected": first["choices"][0]["text"]} in pairs
  assert texts.count("ROMEO:\nGood morrow.") == 1 and len(pairs) == 3  # preferred, correction, +1 vs -1
  assert server.exporter.export() == []  # each record in exactly one chunk: nothing is left to write


def test_metrics_count_requests_tokens_and_the_model(served):
  server, _, _ = served
  _post(server.url, {"prompt": "ROMEO:", "max_tokens": 4, "stream": True})
  text = httpx.get(server.url + "/metrics", timeout=30).text
  assert 'lm_requests_total{route="/v1/completions",status="200"}' in text
  assert "lm_time_to_first_token_seconds_count" in text and "lm_generated_tokens_total" in text
  assert 'lm_model_info{version="shakespeare@step-' in text and "lm_batch_occupancy_bucket" in text
  assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
  assert "lm playground" in httpx.get(server.url + "/", timeout=30).text


def test_schemathesis_finds_no_server_error(served):
  import schemathesis  # pylint: disable=g-import-not-at-top
  server, _, _ = served
  schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
  failures = []
  for result in schema.get_all_operations():
    operation = result.ok()

    @hypothesis.settings(max_examples=25, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy())
    def check(case):
      response = case.call(base_url=server.url, timeout=60)
      if response.status_code >= 500:
        failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))

    check()
  assert not failures


def test_an_api_key_is_required_and_compared_and_off_loopback_one_is_needed(trained_run):
  config = load_config(CONFIG, serve_overrides(**{"serve.api_key": "sekret", "serve.warmup": False}))
  server = serve_app.start_server(config, str(trained_run), report=lambda *args: None)
  try:
    body = {"prompt": "a", "max_tokens": 2}
    assert _post(server.url, body).status_code == 401
    wrong = _post(server.url, body, headers={"Authorization": "Bearer sekreT"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert _post(server.url, body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
  finally:
    server.stop()
  with pytest.raises(ConfigError, match="api_key"):
    serve_app.start_server(load_config(CONFIG, serve_overrides(**{"serve.host": "0.0.0.0"})), str(trained_run))


def test_a_new_checkpoint_is_swapped_in_under_load_without_dropping_a_request(served):
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  server, _, workdir = served
  versions, failures, stop = [], [], threading.Event()  # versions: (when the request was sent, its version)

  def client(index: int) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
      while not stop.is_set():
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": 6, "stream": index % 2 == 0}
        sent = time.monotonic()
        try:
          if body["stream"]:
            with http.stream("POST", "/v1/completions", json=body) as response:
              lines = [line for line in response.iter_lines() if line]
            if response.status_code != 200 or lines[-1] != "data: [DONE]":
              failures.append((response.status_code, lines[-3:]))
              continue
            versions.append((sent, json.loads(lines[-2][len("data: "):])["system_fingerprint"]))
          else:
            response = http.post("/v1/completions", json=body)
            if response.status_code != 200:
              failures.append((response.status_code, response.text))
              continue
            versions.append((sent, response.json()["system_fingerprint"]))
        except Exception as error:  # pylint: disable=broad-except
          failures.append(repr(error))

  threads = [threading.Thread(target=client, args=(index,)) for index in range(32)]
  for thread in threads:
    thread.start()
  try:
    time.sleep(1.0)
    train(load_config(CONFIG, serve_overrides(steps=60, checkpoint_every=20, eval_every=60)), str(workdir))
    for _ in range(600):
      if server.engine.version.step == 60:
        break
      time.sleep(0.05)
    swapped = time.monotonic()  # the swap happened before this: every request sent after it is on the new model
    time.sleep(1.5)
  finally:
    stop.set()
    for thread in threads:
      thread.join(timeout=120)
  assert not failures
  assert server.engine.version.id == "shakespeare@step-60" and server.engine.swaps >= 1
  assert {version for sent, version in versions if sent < swapped} >= {"shakespeare@step-40"}
  after = {version for sent, version in versions if sent > swapped}
  assert after == {"shakespeare@step-60"}
