"""Serving end to end: a real HTTP client over loopback, batching across clients, 4xx on bad input."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from loka.models import Ranker, RankerConfig, SyntheticStream, save_checkpoint
from loka.models.engine import InferenceEngine
pytest.importorskip("uvicorn", reason="serving is the loka[serve] extra")
pytest.importorskip("pydantic", reason="serving is the loka[serve] extra")
from loka.models.serve import ScoringServer
from loka.models.serving_schema import RequestError, batch_to_request, parse_request


def _post(url: str, payload, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/score", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = RankerConfig.from_size("tiny")
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", Ranker(cfg))
    engine = InferenceEngine.from_checkpoint(path, device="cpu")
    with ScoringServer(engine, port=0, max_batch=256, max_wait_ms=20) as server:
        yield cfg, engine, server


def _user_batch(cfg, n):
    batch = SyntheticStream(cfg, n, seed=int(torch.randint(0, 1 << 30, ()))).batch(0)
    # every candidate shares example 0's user, as in a real request
    for name in ("hist_items", "hist_actions", "hist_gaps", "hist_mask", "multi_hot", "multi_hot_mask"):
        value = getattr(batch, name)
        setattr(batch, name, value[:1].expand_as(value).clone())
    for j in (0, 4, 5, 6, 7):
        batch.sparse[:, j] = batch.sparse[0, j]
    return batch


def test_scores_over_loopback_match_the_engine(served):
    cfg, engine, server = served
    batch = _user_batch(cfg, 7)
    status, body = _post(server.url, batch_to_request(batch))
    assert status == 200 and body["n"] == 7
    direct = engine.score(batch)
    for task in cfg.tasks:
        torch.testing.assert_close(torch.tensor(body["scores"][task]), direct[task], rtol=1e-5, atol=1e-6)


def test_concurrent_clients_are_batched_and_each_gets_its_own_scores(served):
    cfg, engine, server = served
    batches = [_user_batch(cfg, n) for n in (3, 5, 2, 8, 1, 4)]
    results = [None] * len(batches)
    before = server.batcher.batches_run

    def client(i):
        results[i] = _post(server.url, batch_to_request(batches[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for batch, (status, body) in zip(batches, results):
        assert status == 200
        torch.testing.assert_close(torch.tensor(body["scores"]["ctr"]), engine.score(batch)["ctr"],
                                   rtol=1e-5, atol=1e-6)
    assert server.batcher.batches_run - before < len(batches)  # some requests shared a forward


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("candidates"), "candidates"),
    (lambda r: r["candidates"][0]["sparse"].update({"1": 10**9}), "out of range"),
    (lambda r: r["candidates"][0]["sparse"].pop("3"), "missing"),
    (lambda r: r["candidates"][0]["dense"].update({"0": "high"}), "candidates[0].dense.0: Input should be a valid number"),
    (lambda r: r["user"]["history"]["items"].append(1), "equal length"),
    (lambda r: r["user"]["history"].update({"items": [1] * 99, "actions": [1] * 99, "gaps_days": [1.0] * 99}),
     "at most"),
    (lambda r: r["user"]["sparse"].update({"x": 1}), "feature index"),
    (lambda r: r.update({"candidates": []}), "candidates"),
])
def test_malformed_requests_get_400_with_a_message(served, mutate, message):
    cfg, _, server = served
    request = batch_to_request(_user_batch(cfg, 2))
    mutate(request)
    status, body = _post(server.url, request)
    assert status == 400 and message in body["error"]


def test_non_json_wrong_path_and_server_survives(served):
    cfg, _, server = served
    status, body = _post(server.url, None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, _ = _post(server.url, None, raw=b"[1, 2]")
    assert status == 400
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/nope", timeout=10)
    assert err.value.code == 404
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_parse_request_rejects_booleans_as_ids():
    cfg = RankerConfig.from_size("tiny")
    request = batch_to_request(_user_batch(cfg, 1))
    request["user"]["sparse"]["0"] = True
    with pytest.raises(RequestError, match="integer"):
        parse_request(cfg, request)


def test_engine_with_fp8_plan_scores_close_to_bf16(tmp_path):
    cfg = RankerConfig.from_size("tiny")
    path = save_checkpoint(tmp_path / "m.pt", Ranker(cfg))
    batch = SyntheticStream(cfg, 32, seed=int(torch.randint(0, 1 << 30, ()))).batch(0)
    hp = InferenceEngine.from_checkpoint(path, device="cpu").score(batch)
    fp8 = InferenceEngine.from_checkpoint(path, plan="fp8", device="cpu")
    assert fp8.convert_result is not None
    lo = fp8.score(batch)
    again = fp8.score(batch)
    torch.testing.assert_close(lo["ctr"], again["ctr"])  # deterministic with cached weights
    from loka.nn import Float8Linear

    fp8_linears = [m for m in fp8.model.modules() if isinstance(m, Float8Linear)]
    assert fp8_linears and all(m.weight_cache.misses == 1 and m.weight_cache.hits >= 1 for m in fp8_linears)  # quantized once
    assert (lo["ctr"] - hp["ctr"]).abs().max() < 0.05


def test_missing_or_negative_content_length_is_refused(served):
    import http.client

    _, _, server = served
    host, port = server._socket.getsockname()[:2]
    for headers, status in (({"Content-Length": "-5"}, 400), ({}, 411)):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.putrequest("POST", "/score")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == status and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()


def test_parse_request_round_trips_and_the_candidate_wins():
    cfg = RankerConfig.from_size("tiny")
    batch = _user_batch(cfg, 9)
    request = batch_to_request(batch)
    parsed = parse_request(cfg, json.dumps(request).encode())
    for name in ("sparse", "dense", "hist_items", "hist_actions", "hist_mask", "multi_hot_mask"):
        torch.testing.assert_close(getattr(parsed, name), getattr(batch, name), rtol=0, atol=0)
    # padding slots of a bag may hold any id in the synthetic batch; a request has none there
    torch.testing.assert_close(parsed.multi_hot * parsed.multi_hot_mask, batch.multi_hot * batch.multi_hot_mask)
    request["user"]["dense"] = {"2": 123.0}  # the candidates' own dense values override the user's
    request["candidates"][4]["dense"].pop("2")  # ... except where a candidate leaves it out
    parsed = parse_request(cfg, request)
    expected = batch.dense[:, 2].clone()
    expected[4] = 123.0
    torch.testing.assert_close(parsed.dense[:, 2], expected, rtol=0, atol=0)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["candidates"][1]["sparse"].update({"2": 40}), "candidates[1].sparse[2]=40 is out of range [0, 40)"),
    (lambda r: r["candidates"][1]["sparse"].update({"02": 3}), "no leading zeros"),
    (lambda r: r["user"]["sparse"].update({"8": 1}), "user.sparse has feature index '8'"),
    (lambda r: r["candidates"][0]["dense"].update({"0": float("nan")}), "candidates[0].dense.0: Input should be a finite"),
    (lambda r: r.update({"candidate": []}), "candidate: Extra inputs are not permitted"),
    (lambda r: r["user"]["history"]["gaps_days"].__setitem__(0, -1.0), "user.history.gaps_days[0]"),
])
def test_parse_request_names_the_field(mutate, message):
    cfg = RankerConfig.from_size("tiny")
    request = batch_to_request(_user_batch(cfg, 3))
    if not request["user"]["history"]["gaps_days"]:
        request["user"]["history"] = {"items": [1], "actions": [0], "gaps_days": [1.0]}
    mutate(request)
    with pytest.raises(RequestError) as err:
        parse_request(cfg, request)
    assert message in str(err.value)


def test_json_syntax_errors_name_the_path_on_any_line():
    cfg = RankerConfig.from_size("tiny")
    raw = b'{"user": {"sparse": {"0": 1, "5": "a\\"b,c"}},\n "candidates": [\n  {"sparse": {"1": 2}},\n  {"sparse": {"1": 2, "2": [[tru]]}}]}'
    with pytest.raises(RequestError, match=r"not valid JSON at candidates\[1\]\.sparse\.2\[0\]\[0\]: .*line 4"):
        parse_request(cfg, raw)
    with pytest.raises(RequestError, match="not valid JSON: .*EOF"):
        parse_request(cfg, b"")
