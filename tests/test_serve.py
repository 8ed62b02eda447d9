"""imgclf serve as a real process on 127.0.0.1: native and KServe v2 endpoints (with tritonclient), metrics,
bad input, drift, graceful shutdown; and the batcher and drift statistics on their own."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from imgclf.deploy.kserve import HEADER

from .conftest import TINY, make_image, run_cli
from .serving import Served, multipart, png


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(tiny_run, d)
    return d


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = Served([f"tiny={run}", f"tiny:2={run}", "--max-images", "8", "--max-pixels", "1000000", "--max-body-mb", "1",
                "--top-k", "3"], tmp_path_factory.mktemp("serve-log"))  # fmt: skip
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [make_image(c % 3, rng) for c in range(6)]


def _local(run, images):
    """The same runtime in this process: the reference for the server's numbers."""
    from imgclf.deploy.runtime import load_predictor, to_pixels

    pred = load_predictor(run, "auto")
    px = to_pixels(images, pred.art)
    return px, *pred(px)


def test_predict_single_multipart_and_json_bodies(server, run, images):
    _, _, probs, _ = _local(run, images)
    st, doc = server.json("POST", "/predict", png(images[1]), {"Content-Type": "image/png"})
    assert st == 200 and doc["model"] == "tiny" and doc["version"] == "2"  # the highest version by default
    p = doc["predictions"][0]
    assert p["top"][0]["label"] == "class_1" and isinstance(p["unknown"], bool) and len(p["top"]) == 3
    assert p["top"][0]["prob"] == pytest.approx(float(probs[1].max()), abs=1e-3)
    body, headers = multipart([(f"{i}.png", png(im)) for i, im in enumerate(images)])
    st, doc = server.json("POST", "/models/tiny/versions/1/predict?top_k=2", body, headers)
    assert st == 200 and doc["version"] == "1"
    assert [q["top"][0]["label"] for q in doc["predictions"]] == [f"class_{i % 3}" for i in range(6)]
    got = np.array([[t["prob"] for t in q["top"]] for q in doc["predictions"]])
    assert np.abs(got - np.sort(probs, 1)[:, ::-1][:, :2]).max() < 1e-3
    js = json.dumps({"images": [base64.b64encode(png(im)).decode() for im in images[:3]]}).encode()
    st, doc = server.json("POST", "/models/tiny/predict", js, {"Content-Type": "application/json"})
    assert st == 200 and [q["top"][0]["label"] for q in doc["predictions"]] == ["class_0", "class_1", "class_2"]
    st, doc = server.json("GET", "/models")
    assert {m["version"] for m in doc["models"]} == {"1", "2"} and doc["models"][0]["classes"][0] == "class_0"


def test_tritonclient_works_unchanged(server, run, images):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    px, logits, probs, feats = _local(run, images)
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny") and c.is_model_ready("tiny", "1")
    meta = c.get_model_metadata("tiny")
    assert meta["inputs"][0] == {"name": "input", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}
    assert {o["name"] for o in meta["outputs"]} >= {"logits", "probs", "features", "unknown", "ood_score"}
    assert c.get_model_config("tiny")["max_batch_size"] == 32
    # binary tensors both ways (tritonclient's default)
    inp = httpclient.InferInput("input", list(px.shape), "UINT8")
    inp.set_data_from_numpy(px)
    res = c.infer("tiny", [inp])
    assert np.abs(res.as_numpy("probs") - probs).max() < 1e-3 and np.abs(res.as_numpy("logits") - logits).max() < 1e-2
    assert res.as_numpy("features").shape == feats.shape and res.as_numpy("unknown").dtype == np.bool_
    # JSON tensors, one version, and the classification extension
    inp = httpclient.InferInput("input", list(px.shape), "UINT8")
    inp.set_data_from_numpy(px, binary_data=False)
    outs = [httpclient.InferRequestedOutput("probs", binary_data=False),
            httpclient.InferRequestedOutput("probs", binary_data=True, class_count=2)]  # fmt: skip
    res = c.infer("tiny", [inp], model_version="1", outputs=outs[:1])
    assert np.abs(res.as_numpy("probs") - probs).max() < 1e-3
    top = c.infer("tiny", [inp], outputs=outs[1:]).as_numpy("probs")
    assert top.shape == (6, 2) and [t.decode().split(":")[2] for t in top[:, 0]] == [f"class_{i % 3}" for i in range(6)]
    # encoded images as BYTES: the server decodes and preprocesses them like /predict
    enc = httpclient.InferInput("image", [3], "BYTES")
    enc.set_data_from_numpy(np.array([png(im) for im in images[:3]], dtype=np.object_))
    assert c.infer("tiny", [enc]).as_numpy("probs").argmax(1).tolist() == [0, 1, 2]
    bad = httpclient.InferInput("input", [1, 16, 16, 3], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"shape \[-1, 32, 32, 3\] expected"):
        c.infer("tiny", [bad])
    with pytest.raises(InferenceServerException, match="no model named"):
        c.infer("nope", [inp])


def _bad_requests(images) -> list[tuple[str, str, bytes | None, dict, tuple[int, ...]]]:
    """(method, path, body, headers, allowed statuses): 200+ malformed requests of many kinds."""
    rng = np.random.default_rng(0)
    good = png(images[0])
    jpeg = __import__("io").BytesIO()
    images[0].save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    img, bad = {"Content-Type": "image/png"}, (400,)
    reqs = []
    for n in rng.integers(0, 3000, 30):  # random bytes
        reqs.append(("POST", "/predict", rng.bytes(int(n)), img, bad))
    for data in (good, jpeg):  # truncated images
        for cut in rng.integers(8, int(0.8 * len(data)), 20):  # inside the pixel data
            reqs.append(("POST", "/predict", data[: int(cut)], img, bad))
    for w, h, st in [
        (30000, 30000, 413),
        (2_000_000, 1, 413),
        (5000, 5000, 413),
        (2000, 2000, 413),
        (65535, 65535, 413),
        (100_000, 10, 400),
        (8, 20_000, 400),
    ]:  # bombs and thin strips by header
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
        reqs.append(("POST", "/predict", head + good[33:], img, (st,)))  # fmt: skip
    from PIL import Image

    reqs.append(("POST", "/predict", png(Image.new("L", (1500, 1500))), img, (413,)))  # a real 2.25 MP image
    for ct in ["text/plain", "application/xml", "", "video/mp4", "application/x-www-form-urlencoded"] * 4:
        reqs.append(("POST", "/predict", good, {"Content-Type": ct} if ct else {}, (415,)))
    for _ in range(4):  # over --max-body-mb 1
        reqs.append(("POST", "/predict", b"\0" * (1_200_000 + int(rng.integers(0, 10**5))), img, (413,)))
    js = {"Content-Type": "application/json"}
    for body in [b"{", b"[]", b'{"images": "x"}', b'{"images": [1, 2]}', b'{"images": ["***"]}', b"\xff\xfe",
                 b'{"imgs": []}', b"null", json.dumps({"images": [base64.b64encode(b"nope").decode()]}).encode(),
                 b'{"images": []}'] * 2:  # fmt: skip
        reqs.append(("POST", "/predict", body, js, bad))
    mp_good, mp_headers = multipart([("a.png", good)])
    for body, headers in [
        (mp_good, {"Content-Type": "multipart/form-data"}),  # no boundary
        (mp_good, {"Content-Type": "multipart/form-data; boundary=other"}),
        (mp_good[: len(mp_good) // 2], mp_headers),  # truncated
        (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nhello\r\n--x--\r\n",
         {"Content-Type": "multipart/form-data; boundary=x"}),  # no file parts
        (multipart([("a.png", b"not an image")])[0], None),
    ] * 4:  # fmt: skip
        reqs.append(("POST", "/predict", body, headers or mp_headers, bad))
    many, many_h = multipart([(f"{i}.png", good) for i in range(9)])
    reqs += [("POST", "/predict", many, many_h, (413,))] * 3
    v2, octet = "/v2/models/tiny/infer", {"Content-Type": "application/octet-stream"}
    px = np.zeros((1, 32, 32, 3), np.uint8)

    def kserve(inputs, extra=None):
        return json.dumps({"inputs": inputs, **(extra or {})}).encode()

    tensor = {"name": "input", "datatype": "UINT8", "shape": [1, 32, 32, 3]}
    v2_bodies = [
        (b"not json", {}), (b"{}", {}), (kserve([]), {}), (kserve("x"), {}), (kserve([{"datatype": "UINT8"}]), {}),
        (kserve([{**tensor, "datatype": "FP8", "data": [0]}]), {}),
        (kserve([{**tensor, "shape": [1, 16, 16, 3], "data": [0] * 768}]), {}),
        (kserve([{**tensor, "shape": [-1, 32, 32, 3], "data": [0]}]), {}),
        (kserve([{**tensor, "data": [0] * 10}]), {}), (kserve([{**tensor, "data": [300] * 3072}]), {}),
        (kserve([{**tensor, "data": "abc"}]), {}), (kserve([tensor]), {}),
        (kserve([{**tensor, "datatype": "FP32", "data": [0.5] * 3072}]), {}),
        (kserve([{**tensor, "parameters": {"binary_data_size": 3072}}]), {}),  # no binary part
        (kserve([{**tensor, "data": px.ravel().tolist()}, {**tensor, "name": "x", "data": px.ravel().tolist()}]), {}),
        (kserve([{**tensor, "data": px.ravel().tolist()}], {"outputs": [{"name": "nope"}]}), {}),
        (kserve([{**tensor, "data": px.ravel().tolist()}], {"outputs": "probs"}), {}),
        (kserve([{**tensor, "data": px.ravel().tolist()}],
                {"outputs": [{"name": "probs", "parameters": {"classification": -1}}]}), {}),
        (kserve([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]), {}),
        (kserve([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"x").decode()]}]), {}),
        (kserve([{**tensor, "shape": [0, 32, 32, 3], "data": []}]), {}),
        (kserve([{**tensor, "shape": [4294967296, 4294967296, 1, 3], "data": []}]), {}),
        (kserve([{**tensor, "shape": [2**63, 0], "data": []}]), {}),
        (kserve([{**tensor, "shape": [True], "data": [1]}]), {}),
        (kserve([{**tensor, "parameters": [1], "data": [0] * 3072}]), {}),
        (b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1], "data": [' + b"9" * 5000 + b"]}]}", {}),
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
        (kserve([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["\u00e9"]}]), {}),
        (kserve([{**tensor, "data": px.ravel().tolist()}],
                {"outputs": [{"name": "ood_score", "parameters": {"classification": 1}}]}), {}),
        (kserve([{**tensor, "data": px.ravel().tolist()}, {**tensor, "data": px.ravel().tolist()}]), {}),
    ]  # fmt: skip
    head = kserve([{**tensor, "parameters": {"binary_data_size": 3072}}])
    v2_bodies += [
        (head + px.tobytes(), {"Inference-Header-Content-Length": "abc"}),
        (head + px.tobytes(), {"Inference-Header-Content-Length": str(len(head) + 99999)}),
        (head + px.tobytes()[:100], {"Inference-Header-Content-Length": str(len(head))}),
        (head + px.tobytes() + b"extra", {"Inference-Header-Content-Length": str(len(head))}),
        (head + px.tobytes(), {"Inference-Header-Content-Length": "-5"}),
    ]
    for body, h in v2_bodies * 2:
        reqs.append(("POST", v2, body, {**octet, **h}, bad + (413,)))
    many_empty = kserve([{"name": "image", "datatype": "BYTES", "shape": [100_000],
                          "parameters": {"binary_data_size": 400_000}}])  # fmt: skip
    reqs.append(("POST", v2, many_empty + b"\0" * 400_000, {**octet, HEADER: str(len(many_empty))}, (413,)))
    for q in ["top_k=abc", "top_k=0", "top_k=-3", "top_k=1.5"] * 2:
        reqs.append(("POST", f"/predict?{q}", good, img, bad))
    for path in ["/models/nope/predict", "/models/tiny/versions/9/predict", "/v2/models/nope/infer",
                 "/v2/models/tiny/versions/7/infer", "/nothing"] * 2:  # fmt: skip
        reqs.append(("POST", path, good, img, (404,)))
    reqs += [("GET", "/predict", None, {}, (405,)), ("PUT", "/v2/models/tiny/infer", b"", {}, (405,))] * 3
    return reqs


def test_malformed_requests_get_4xx_and_the_server_stays_correct(server, images):
    reqs = _bad_requests(images)
    assert len(reqs) >= 200
    wrong = []
    for method, path, body, headers, allowed in reqs:
        try:
            status, _, data = server.request(method, path, body, headers)
        except (ConnectionError, OSError) as e:  # an oversized body may be cut off after the 413 is sent
            if allowed != (413,):
                wrong.append((path, headers, body[:40] if body else body, type(e).__name__))
            continue
        if status not in allowed:
            wrong.append((path, headers, body[:40] if body else body, allowed, status, data[:200]))
        elif status != 405:
            assert "error" in json.loads(data), (path, data)
    assert not wrong, wrong[:5]
    assert server.proc.poll() is None
    st, doc = server.json("POST", "/predict", png(images[2]), {"Content-Type": "image/png"})
    assert st == 200 and doc["predictions"][0]["top"][0]["label"] == "class_2"
    _, _, metrics = server.request("GET", "/metrics")
    text = metrics.decode()
    assert not re.search(r'code="5\d\d"', text), "a 5xx was served"
    assert "Traceback" not in server.log()
    rejected = sum(float(v) for v in re.findall(r'imgclf_rejected_total\{[^}]*reason="bad_request"\} (\S+)', text))
    assert rejected >= 150


def test_metrics_count_requests_batches_and_unknowns(server, images):
    body, headers = multipart([(f"{i}.png", png(im)) for i, im in enumerate(images)])
    for _ in range(3):
        assert server.request("POST", "/predict", body, headers)[0] == 200
    _, h, data = server.request("GET", "/metrics")
    text = data.decode()
    assert h["Content-Type"].startswith("text/plain")
    for name in ("imgclf_requests_total", "imgclf_request_seconds_bucket", "imgclf_batch_size_bucket",
                 "imgclf_queue_images", "imgclf_images_total", "imgclf_unknown_total", "imgclf_unknown_rate",
                 "imgclf_inference_seconds_count", "imgclf_drifted"):  # fmt: skip
        assert name in text, name
    images_total = float(re.search(r'imgclf_images_total\{model="tiny:2"\} (\S+)', text).group(1))
    assert images_total >= 18
    st, doc = server.json("GET", "/drift")
    assert st == 200 and set(doc["models"]) == {"tiny:1", "tiny:2"} and doc["models"]["tiny:2"]["n"] >= 18


def test_drift_low_on_fashion_mnist_and_high_on_digits(tmp_path):
    """A model trained on Fashion-MNIST, served twice: its test images keep drift low, scanned digits raise it."""
    # no HTML report (12 Grad-CAMs of the top losses) and OOD feature statistics from 500 of the 4500 training
    # images: neither reaches the drift reference (the validation split's calibrated outputs) nor this test
    r = run_cli("train", "--data", "builtin:fashion-mnist", "--epochs", "1", "--output", tmp_path, "--name", "fm",
                *TINY, "--batch-size", "64", "--trust.report", "false", "--trust.ood_max_train", "500")  # fmt: skip
    assert r.code == 0, r
    run = tmp_path / "fm"
    ref = json.loads((run / "imgclf.json").read_text())["drift"]
    assert ref["n"] == 500 and len(ref["class_dist"]) == 10 and len(ref["emb_mean"]) > 0
    s = Served([f"fm={run}", f"fm:2={run}", "--drift-window", "300", "--drift-min-samples", "100"], tmp_path)
    try:
        from imgclf.data.sources import open_source

        for version, source in (("1", "builtin:fashion-mnist:test"), ("2", "builtin:digits")):
            src = open_source(source)
            idx = np.random.default_rng(0).permutation(len(src))[:300]
            for chunk in np.array_split(idx, 20):
                body, headers = multipart([(f"{i}.png", png(src.load(int(i)))) for i in chunk])
                assert s.request("POST", f"/models/fm/versions/{version}/predict", body, headers)[0] == 200
        st, doc = s.json("GET", "/drift")
        same, other = doc["models"]["fm:1"], doc["models"]["fm:2"]
        assert same["status"] == "ok" and same["drifted"] == [], same
        assert other["status"] == "drift" and len(other["drifted"]) >= 2, other
        for stat in ("psi_class", "psi_confidence", "embedding_shift"):
            assert other[stat] > 3 * same[stat], (stat, same, other)
        text = s.request("GET", "/metrics")[2].decode()
        assert 'imgclf_drifted{model="fm:2"} 1.0' in text and 'imgclf_drifted{model="fm:1"} 0.0' in text
        assert re.search(r'imgclf_drift\{model="fm:2",statistic="psi_class"\} [1-9]', text) or other["psi_class"] < 1
    finally:
        assert s.stop() == 0
    assert "drift on model fm:2" in s.log() and "drift on model fm:1" not in s.log()


def test_sigterm_drains_queued_requests(run, images, tmp_path):
    s = Served([run, "--runtime", "torch", "--max-delay-ms", "1500", "--max-batch", "64"], tmp_path)
    results = []

    def call(i):
        results.append((i, *s.json("POST", "/predict", png(images[i]), {"Content-Type": "image/png"})))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # all four are queued, waiting for the batch to fill (1.5 s)
    assert s.stop() == 0
    for t in threads:
        t.join(10)
    assert sorted((i, st, doc["predictions"][0]["top"][0]["label"]) for i, st, doc in results) == [
        (i, 200, f"class_{i % 3}") for i in range(4)
    ]
    assert "stopped" in s.log()


# ------------------------------------------------------------------ units


def _run_async(coro):
    import asyncio

    return asyncio.run(coro)


def test_batcher_merges_requests_and_returns_each_its_rows():
    import asyncio

    from imgclf.deploy.batcher import Batcher

    sizes = []

    def fn(px):
        sizes.append(len(px))
        return {"sum": px.reshape(len(px), -1).sum(1)}

    async def main():
        b = Batcher(fn, max_batch=8, max_delay_ms=50, max_queue=64)
        b.start()
        reqs = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate([1, 3, 2, 4, 1, 5])]
        outs = await asyncio.gather(*(b.submit(r) for r in reqs))
        await b.drain()
        return reqs, outs

    reqs, outs = _run_async(main())
    for r, o in zip(reqs, outs):
        assert o["sum"].tolist() == [int(r[0].sum())] * len(r)
    assert sum(sizes) == 16 and max(sizes) <= 8 and len(sizes) < 6  # merged, never over max_batch


def test_batcher_queue_full_drain_and_errors():
    import asyncio

    from imgclf.deploy.batcher import Batcher, Draining, QueueFull

    def slow(px):
        time.sleep(0.3)
        if (px == 9).any():
            raise ValueError("runtime failed")
        return {"x": px[:, 0, 0, 0]}

    async def main():
        b = Batcher(slow, max_batch=4, max_delay_ms=0, max_queue=4)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((4, 1, 1, 3), np.uint8)))
        await asyncio.sleep(0.05)  # the first batch is running; the queue is empty again
        queued = asyncio.ensure_future(b.submit(np.ones((4, 1, 1, 3), np.uint8)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as e:
            await b.submit(np.ones((1, 1, 1, 3), np.uint8))
        assert e.value.retry_after >= 1
        await asyncio.gather(first, queued)
        with pytest.raises(ValueError, match="runtime failed"):
            await b.submit(np.full((1, 1, 1, 3), 9, np.uint8))
        after = await b.submit(np.full((2, 1, 1, 3), 3, np.uint8))  # still working after a failed batch
        drained = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0)
        with pytest.raises(Draining):
            await b.submit(np.ones((1, 1, 1, 3), np.uint8))
        return first.result(), queued.result(), after, await drained

    first, queued, after, drained = _run_async(main())
    assert first["x"].tolist() == [0] * 4 and queued["x"].tolist() == [1] * 4 and after["x"].tolist() == [3, 3]
    assert drained is True


def test_drift_statistics():
    from scipy.stats import ks_2samp

    from imgclf.eval.drift import drift_scores, drifted, ks_to_quantiles, psi, reference_stats

    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0
    p, q = np.array([0.25, 0.25, 0.5]), np.array([0.5, 0.25, 0.25])
    assert psi(p, q) == pytest.approx(((q - p) * np.log(q / p)).sum())
    rng = np.random.default_rng(0)
    a, b = rng.beta(5, 1, 20000), rng.beta(3, 1, 3000)
    quant = np.quantile(a, np.linspace(0, 1, 101))
    assert ks_to_quantiles(b, quant) == pytest.approx(ks_2samp(a, b).statistic, abs=0.02)
    assert ks_to_quantiles(rng.beta(5, 1, 3000), quant) < 0.04

    def saturated(n):  # 40 % of confidences exactly 1.0: the tie must not read as drift
        c = rng.uniform(0, 1, n)
        c[rng.random(n) < 0.4] = 1.0
        return c

    ref_sat = saturated(20000)
    quant = np.quantile(ref_sat, np.linspace(0, 1, 101))
    live = saturated(3000)
    assert ks_to_quantiles(live, quant) == pytest.approx(ks_2samp(ref_sat, live).statistic, abs=0.02)
    live = rng.uniform(0, 1, 3000)  # the atom gone
    assert ks_to_quantiles(live, quant) == pytest.approx(ks_2samp(ref_sat, live).statistic, abs=0.02)
    k, d = 5, 16
    logits = rng.normal(0, 2, (4000, k))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feats = rng.normal(1.0, 2.0, (4000, d))
    ref = json.loads(json.dumps(reference_stats(probs[:2000], feats[:2000])))  # JSON round trip
    same = drift_scores(ref, probs[2000:2500], feats[2000:2500])
    assert same["psi_class"] < 0.05 and same["psi_confidence"] < 0.05 and same["embedding_shift"] < 0.15
    assert drifted(same) == []
    shifted = drift_scores(ref, probs[2000:2500], feats[2000:2500] + 1.0)  # +0.5 std on every dimension
    assert shifted["embedding_shift"] == pytest.approx(0.5, abs=0.1) and drifted(shifted) == ["embedding_shift"]
    skew = probs[2000:][probs[2000:].argmax(1) == 0]
    assert drift_scores(ref, skew)["psi_class"] > 1 and "psi_class" in drifted(drift_scores(ref, skew))


def test_calibrate_without_data_refits_on_the_runs_own_val_split(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "copy")
    doc = json.loads((copy / "imgclf.json").read_text())
    del doc["drift"]
    doc["config"]["data"]["val_split"] = 0.3  # the run's split rebuilt from its config: 15 of 48 images
    (copy / "imgclf.json").write_text(json.dumps(doc))
    r = run_cli("calibrate", copy, "--no-progress", "--workers", "0")
    assert r.code == 0, r
    ref = json.loads((copy / "imgclf.json").read_text())["drift"]
    assert ref["n"] == 15 and len(ref["class_dist"]) == 3 and "validation split" in ref["data"]


def test_serve_rejects_bad_specs_and_options(tmp_path):
    r = run_cli("serve", tmp_path / "missing")
    assert r.code == 2 and "not a run directory" in r.err
    r = run_cli("serve", tmp_path, "--max-batch", "0")
    assert r.code == 2 and "--max-batch must be >= 1" in r.err
    r = run_cli("serve", tmp_path, "--drift-threshold", "psi=1")
    assert r.code == 2 and "unknown statistic 'psi'" in r.err


def test_batcher_survives_a_failure_outside_the_runtime_call():

    from imgclf.deploy.batcher import Batcher

    calls = []

    def observer(n, seconds):  # a bug in a callback must fail its batch, not kill the worker
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("observer bug")

    async def main():
        b = Batcher(lambda px: {"x": px[:, 0, 0, 0]}, max_batch=4, max_delay_ms=0, max_queue=8, on_batch=observer)
        b.start()
        with pytest.raises(RuntimeError, match="observer bug"):
            await b.submit(np.zeros((1, 1, 1, 3), np.uint8))
        out = await b.submit(np.full((2, 1, 1, 3), 7, np.uint8))
        healthy = b.healthy()
        await b.drain()
        return out, healthy

    out, healthy = _run_async(main())
    assert out["x"].tolist() == [7, 7] and healthy


def test_batcher_decodes_uploads_in_rounds_and_fails_only_the_bad_request():
    """Encoded uploads are decoded in rounds (every request that arrived while the last round ran, in a couple of
    pool tasks: not one per request); a request whose image does not decode gets its own error and the others
    of the batch their rows, in request order."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.deploy.batcher import Batcher

    sizes, submits = [], []

    class Pool(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            submits.append(1)
            return super().submit(*args, **kwargs)

    def prepare(items):  # "decode": one uint8 image per item, of the value written in it
        time.sleep(0.05 if items == [b"1"] else 0)  # the first round runs while the others arrive
        if b"bad" in items:
            raise ValueError("not an image")
        return np.stack([np.full((2, 2, 3), int(x), np.uint8) for x in items])

    def fn(px):
        sizes.append(len(px))
        return {"v": px[:, 0, 0, 0].astype(np.int64)}

    async def main():
        pool = Pool(2)
        b = Batcher(fn, max_batch=32, max_delay_ms=200, max_queue=64, prepare=prepare, pool=pool, prepare_threads=2)
        b.start()
        reqs = [[b"1"], [b"2", b"3"], [b"bad"], [b"4", b"5", b"6"], np.full((2, 2, 2, 3), 9, np.uint8)]
        reqs += [[str(k).encode()] for k in range(10, 18)]
        outs = await asyncio.gather(*(b.submit(r, len(r)) for r in reqs), return_exceptions=True)
        await b.drain()
        pool.shutdown()
        return outs

    outs = _run_async(main())
    assert [o["v"].tolist() for i, o in enumerate(outs) if i != 2] == [[1], [2, 3], [4, 5, 6], [9, 9]] + [
        [k] for k in range(10, 18)
    ]
    assert isinstance(outs[2], ValueError) and str(outs[2]) == "not an image"
    assert sizes == [16]  # one runtime call: the 16 images that decoded
    assert len(submits) == 3  # 12 requests to decode: a round of the first, then one of the rest in 2 tasks


def test_batcher_decodes_the_next_full_batch_while_the_runtime_works_and_counts_it_queued():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.deploy.batcher import Batcher, QueueFull

    log = []

    def prepare(items):
        log.append(("decode", items[0], time.perf_counter()))
        return np.zeros((len(items), 1, 1, 3), np.uint8)

    def fn(px):
        log.append(("run", len(px), time.perf_counter()))
        time.sleep(0.4)
        log.append(("done", len(px), time.perf_counter()))
        return {"x": px[:, 0, 0, 0]}

    async def main():
        pool = ThreadPoolExecutor(1)
        b = Batcher(fn, max_batch=4, max_delay_ms=0, max_queue=8, prepare=prepare, pool=pool)
        b.start()
        first = asyncio.ensure_future(b.submit([b"a"] * 4, 4))
        await asyncio.sleep(0.1)  # the first batch runs
        second = asyncio.ensure_future(b.submit([b"b"] * 4, 4))
        await asyncio.sleep(0.1)  # taken and decoded, waiting for the runtime: still 4 queued images
        queued = b.queued_images
        third = asyncio.ensure_future(b.submit([b"c"] * 4, 4))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit([b"d"], 1)
        await asyncio.gather(first, second, third)
        await b.drain()
        pool.shutdown()
        return queued

    assert _run_async(main()) == 4
    t = {(kind, what): when for kind, what, when in log}
    runs = [when for kind, _, when in log if kind == "run"]
    assert t[("decode", b"b")] < t[("done", 4)]  # decoded while the first batch ran
    assert len(runs) == 3 and all(b - a >= 0.39 for a, b in zip(runs, runs[1:]))  # one runtime call at a time


def test_drift_monitor_checks_at_most_once_per_interval():
    from imgclf.deploy.monitor import DriftMonitor

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 1000).astype(np.float32)
    ref = __import__("imgclf.eval.drift", fromlist=["reference_stats"]).reference_stats(probs)
    mon = DriftMonitor(json.loads(json.dumps(ref)), window=100, min_samples=10, check_every=10, min_interval_s=30)
    checks = []
    mon.check = lambda orig=mon.check: checks.append(1) or orig()
    for i in range(50):  # 500 images, 50 chances to check every 10 images
        mon.update(probs[i * 10 : (i + 1) * 10], None, None)
    assert len(checks) == 1 and mon.last["n"] == 10  # the first one only, within the 30 s interval
    assert mon.check()["n"] == 100  # on demand: at once


def _queue_gauge(s: Served) -> float:
    m = re.search(r"imgclf_queue_images\{[^}]*\} (\S+)", s.request("GET", "/metrics")[2].decode())
    return float(m.group(1)) if m else 0.0


def test_a_full_queue_refuses_before_the_body_is_read_and_paces_retries(run, images, tmp_path):
    """503 + Retry-After as soon as the headers are in when the queue is full: the body is neither waited for
    nor parsed, a keep-alive connection that retries at once is not read again for --refuse-pause-ms (a one-shot
    connection gets its refusal that much later), and the queued request gets its usual answers."""
    import http.client
    import socket

    s = Served([run, "--runtime", "torch", "--max-delay-ms", "6000", "--max-batch", "64", "--max-queue", "2",
                "--max-images", "2", "--refuse-pause-ms", "500"], tmp_path)  # fmt: skip
    try:
        body, headers = multipart([(f"{i}.png", png(images[i])) for i in range(2)])
        results = []
        t = threading.Thread(target=lambda: results.append(s.json("POST", "/predict", body, headers)))
        t.start()
        t0 = time.time()
        while _queue_gauge(s) < 2 and time.time() - t0 < 30:  # the two images wait for their batch (6 s)
            time.sleep(0.05)
        assert _queue_gauge(s) == 2
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:  # headers only, body never sent
            t1 = time.perf_counter()
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 900000\r\n\r\n"
            )
            r = http.client.HTTPResponse(sock)
            r.begin()
            assert r.status == 503 and int(r.getheader("Retry-After")) >= 1
            assert time.perf_counter() - t1 < 5  # not waiting for the body (--read-timeout-s is 30 s)
            assert json.loads(r.read(int(r.getheader("Content-Length"))))["error"] == "model tiny:1 is busy"
        st, h, data = s.request("POST", "/predict", b"not an image", {"Content-Type": "image/png"})
        assert st == 503 and "Retry-After" in h  # refused, not parsed (a parsed body would be a 400)
        t1 = time.perf_counter()  # a one-shot connection: its refusal itself waits out the pause
        st, h, data = s.request(
            "POST", "/predict", png(images[0]), {"Content-Type": "image/png", "Connection": "close"}
        )
        assert st == 503 and time.perf_counter() - t1 >= 0.45
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        try:
            for _ in range(2):  # the same connection, again at once: its second request waits out the pause
                t1 = time.perf_counter()
                conn.request("POST", "/predict", png(images[0]), {"Content-Type": "image/png"})
                r = conn.getresponse()
                r.read()
                assert r.status == 503
            assert time.perf_counter() - t1 >= 0.45
        finally:
            conn.close()
        t.join(30)
        st, doc = results[0]
        assert st == 200 and [p["top"][0]["label"] for p in doc["predictions"]] == ["class_0", "class_1"]
        text = s.request("GET", "/metrics")[2].decode()
        assert float(re.search(r'imgclf_rejected_total\{model="tiny:1",reason="queue_full"\} (\S+)', text)[1]) == 5
        assert re.search(r'imgclf_requests_total\{code="503",endpoint="/predict",model="tiny:1"\} 5\.0', text)
    finally:
        assert s.stop() == 0


def test_batcher_stops_counting_a_request_whose_client_left():
    import asyncio

    from imgclf.deploy.batcher import Batcher

    async def main():
        b = Batcher(lambda px: {"x": px[:, 0, 0, 0]}, max_batch=8, max_delay_ms=300, max_queue=8)
        b.start()
        gone = asyncio.ensure_future(b.submit(np.zeros((6, 1, 1, 3), np.uint8)))
        await asyncio.sleep(0.02)
        before = b.queued_images
        gone.cancel()  # a client that disconnected (or timed out) while its request waited
        await asyncio.sleep(0.02)
        after = b.queued_images
        out = await b.submit(np.full((8, 1, 1, 3), 5, np.uint8))  # the whole queue is free again at once
        await b.drain()
        return before, after, out, b.queued_images

    before, after, out, end = _run_async(main())
    assert (before, after, end) == (6, 0, 0) and out["x"].tolist() == [5] * 8


def test_batcher_goes_on_when_a_request_of_the_batch_leaves_before_its_decode():
    """A request taken into a batch whose client leaves before a decode round reaches it: the batch runs
    without it (this once spun the event loop at 100 % CPU, answering nothing, after a wrk run ended)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.deploy.batcher import Batcher

    def prepare(items):
        time.sleep(0.2 if items == [b"a"] else 0)
        return np.zeros((len(items), 1, 1, 3), np.uint8)

    async def main():
        pool = ThreadPoolExecutor(1)
        b = Batcher(lambda px: {"x": px[:, 0, 0, 0]}, max_batch=8, max_delay_ms=0, max_queue=8, prepare=prepare,
                    pool=pool)  # fmt: skip
        b.start()
        a = asyncio.ensure_future(b.submit([b"a"], 1))  # its round starts at once and takes 0.2 s
        gone = asyncio.ensure_future(b.submit([b"b"], 1))  # queued undecoded, taken into the batch with a
        await asyncio.sleep(0.05)
        gone.cancel()
        out = await asyncio.wait_for(a, 5)
        later = await asyncio.wait_for(b.submit([b"c"], 1), 5)
        await b.drain()
        pool.shutdown()
        return out, later, gone.cancelled(), b.queued_images

    out, later, cancelled, queued = _run_async(main())
    assert len(out["x"]) == 1 and len(later["x"]) == 1 and cancelled and queued == 0
