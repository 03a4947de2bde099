"""Fake SGLang servers for unit tests: http.server threads on 127.0.0.1.

A well-behaved fake answers ``/generate`` with values from closed-form formulas
(:func:`expected_output`, :func:`expected_logprob`, :func:`expected_route`) a test computes
independently; a ``behaviour(path, body, count) -> (status, payload)`` makes it misbehave.
"""

import base64
import contextlib
import http.server
import json
import pickle
import threading

import numpy as np

from megatron_pr2.rollout.route_codec import RouteShape

VOCAB, LAYERS, TOP_K, EXPERTS = 64, 4, 2, 8
# The served model has a dense layer 1: SGLang still sends 4 layers, layer 1 all zero.
ROUTE_SHAPE = RouteShape(num_hidden_layers=LAYERS, moe_layer_indices=(0, 2, 3), top_k=TOP_K,
                         num_experts=EXPERTS)


def expected_output(prompt, n):
    return [(sum(prompt) + 3 * i) % VOCAB for i in range(n)]


def expected_logprob(i):
    return -0.25 * (i + 1)


def expected_route(t, layer):
    return [(t + layer) % EXPERTS, (t + layer + 3) % EXPERTS]


def wire_routes(num_rows, dtype="<i4", dense=(1,)):
    routes = np.array([[expected_route(t, l) for l in range(LAYERS)] for t in range(num_rows)])
    routes[:, list(dense)] = 0
    return base64.b64encode(routes.astype(dtype).tobytes()).decode()


def good_answer(body):
    prompt, n = body["input_ids"], body["sampling_params"]["max_new_tokens"]
    out = expected_output(prompt, n)
    meta = {
        "finish_reason": {"type": "length", "length": n},
        "prompt_tokens": len(prompt),
        "output_token_logprobs": [[expected_logprob(i), tok, None] for i, tok in enumerate(out)],
    }
    if body.get("return_routed_experts"):
        meta["routed_experts"] = wire_routes(len(prompt) + n - 1 - body["routed_experts_start_len"])
    return {"output_ids": out, "meta_info": meta}


class FakeSGLang:
    """A loopback HTTP server; ``behaviour(path, body, count) -> (status, payload)``.

    ``port``: listen there (a server restarted at the address of a stopped one); default a free
    one.
    """

    def __init__(self, behaviour=None, port: int = 0):
        self.behaviour = behaviour or (lambda path, body, count: (200, good_answer(body)))
        self.requests = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                fake.requests.append((self.path, body))
                status, payload = fake.behaviour(self.path, body, len(fake.requests))
                if status is None:  # drop the connection without answering
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self._answer(json.loads(self.rfile.read(length) or b"{}"))

            def do_GET(self):
                self._answer(None)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def address(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_servers(*behaviours):
    servers = [FakeSGLang(b) for b in behaviours]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def closed_address():
    server = FakeSGLang()
    address = server.address
    server.stop()
    return address


class WeightServer:
    """A :class:`FakeSGLang` behaviour: a float32 server that generates (:func:`good_answer`),
    answers ``/health`` and records the tensors of each weight-update session it ended
    (``/update_weights_from_tensor`` between begin and end); ``refuse_weights``: every update
    fails with HTTP 500."""

    def __init__(self, refuse_weights=False):
        self.refuse_weights = refuse_weights
        self.session = None
        self.completed = []  # one {name: tensor} per finished update session
        self.version = "default"  # SGLang's tag before /update_weight_version

    def __call__(self, path, body, count):
        if path == "/server_info":
            return 200, {"dtype": "float32", "tp_size": 1, "pp_size": 1}
        if path == "/generate":
            answer = good_answer(body)
            answer["meta_info"]["weight_version"] = self.version
            return 200, answer
        if path == "/update_weight_version":
            self.version = body["new_version"]
        if path == "/begin_weight_update" and body is None:  # a GET: SGLang's POST-only route
            return 405, {"detail": "Method Not Allowed"}
        if path == "/begin_weight_update":
            self.session = {}
        elif path == "/update_weights_from_tensor":
            if self.refuse_weights:
                return 500, {"success": False, "message": "out of memory"}
            self.session.update(pickle.loads(base64.b64decode(body["serialized_named_tensors"][0])))
        elif path == "/end_weight_update":
            self.completed.append(self.session)
            self.session = None
        return 200, {"success": True}
