"""LitServe serving an imgclf run the same way ``imgclf serve`` does, for the load test (bench/serve_load.py).

Same runtime (imgclf's fastest Predictor), same decoding and preprocessing (``decode_image`` +
``to_pixels``), same batching settings (max batch 32, 5 ms), same top-5 JSON answer; only the
server differs. (It does less per image than imgclf serve: no OOD score, no drift window, no metrics.)

Usage: python bench/litserve_app.py RUN PORT [--max-batch 32] [--max-delay-ms 5] [--runtime auto]
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np


class ImgclfAPI(ls.LitAPI):
    def __init__(self, run: str, runtime: str = "auto", **kw):
        super().__init__(**kw)
        self.run, self.runtime = run, runtime

    def setup(self, device):
        from imgclf.deploy.runtime import load_predictor

        self.pred = load_predictor(self.run, self.runtime)
        self.names = self.pred.art.class_names

    def decode_request(self, request):
        from imgclf.data.images import decode_image
        from imgclf.deploy.runtime import to_pixels

        return to_pixels([decode_image(request["content"].file.read())], self.pred.art)[0]

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.pred(x)[1]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        top = np.argsort(-probs)[:5]
        return {"label": self.names[top[0]], "top": [{"label": self.names[c], "prob": float(probs[c])} for c in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("port", type=int)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--runtime", default="auto")
    a = ap.parse_args()
    api = ImgclfAPI(a.run, a.runtime, max_batch_size=a.max_batch, batch_timeout=a.max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    # no access log, like imgclf serve
    server.run(host="127.0.0.1", port=a.port, generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
