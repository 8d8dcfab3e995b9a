"""The server mode of the vLLM stand-in (test-owned): ``python -m tests.vllm_standin.server --model PATH --port P``.

It answers on 127.0.0.1 the requests TRL 1.16's ``VLLMClient`` sends to a ``vllm serve`` started by ``trl vllm-serve``
(dev mode, weight transfer on, ``--logprobs-mode processed_logprobs``), from one :class:`Engine`. Weight updates arrive
over the gloo channel of ``channel.py``. ``GET /standin/weights`` (safetensors bytes) and ``GET /standin/stats``
(generated tokens, weight updates) exist for the tests only.
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from tests.vllm_standin.channel import join
from tests.vllm_standin.engine import Engine, Sampling

SAMPLING_FIELDS = set(Sampling.__dataclass_fields__)
#: request fields of ``/v1/completions`` that shape the response, not the sampling
RESPONSE_FIELDS = {"model", "prompt", "return_token_ids", "return_tokens_as_token_ids"}


class StandInServer:
    def __init__(self, model: str, seed: int = 0, dtype: str = "auto"):
        self.model_name = model
        self.engine = Engine(model, dtype=dtype, seed=seed)
        self.channel = None
        self.weight_updates = 0
        self.requests = 0

    # --- endpoints: (method, path) -> handler(body) -> JSON-able, or bytes ---

    def routes(self):
        return {
            ("GET", "/health"): lambda body: {},
            ("GET", "/v1/models"): lambda body: {"object": "list", "data": [{"id": self.model_name}]},
            ("GET", "/server_info"): lambda body: {
                "vllm_config": {
                    "model_config": {
                        "model": self.model_name,
                        "logprobs_mode": "processed_logprobs",
                        "max_model_len": self.engine.max_model_len,
                    },
                    "weight_transfer_config": {"backend": "gloo (tests' stand-in for nccl)"},
                }
            },  # fmt: skip
            ("GET", "/get_world_size"): lambda body: {"world_size": 1},
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/init_weight_transfer_engine"): self.init_weight_transfer,
            ("POST", "/start_weight_update"): lambda body: {},
            ("POST", "/update_weights"): self.update_weights,
            ("POST", "/finish_weight_update"): lambda body: {},
            ("POST", "/reset_prefix_cache"): lambda body: {"success": True},
            ("GET", "/standin/stats"): lambda body: {
                "generated_tokens": self.engine.generated_tokens,
                "weight_updates": self.weight_updates,
                "requests": self.requests,
                "tensors_loaded": self.engine.weight_loads,
            },  # fmt: skip
            ("GET", "/standin/weights"): self.weights,
        }

    def completions(self, body: dict):
        prompts = body["prompt"]
        if not prompts or not all(isinstance(p, list) for p in prompts):
            raise ValueError("the vLLM stand-in takes token-id prompts only (a list of lists of ints)")
        unknown = set(body) - SAMPLING_FIELDS - RESPONSE_FIELDS
        if unknown:
            raise ValueError(f"the vLLM stand-in does not implement {sorted(unknown)}")
        params = Sampling(**{k: v for k, v in body.items() if k in SAMPLING_FIELDS})
        self.requests += 1
        choices = []
        for prompt in prompts:  # prompt-major: the n completions of a prompt, then the next prompt's
            for seq in self.engine.generate(prompt, params):
                logprobs = None
                if seq.logprobs is not None:
                    logprobs = {
                        "tokens": [f"token_id:{t}" for t in seq.token_ids],
                        "token_logprobs": [pos[t][0] for pos, t in zip(seq.logprobs, seq.token_ids, strict=True)],
                        "top_logprobs": [{f"token_id:{i}": lp for i, (lp, _) in pos.items()} for pos in seq.logprobs],
                    }
                choices.append({"index": len(choices), "text": "", "prompt_token_ids": list(prompt),
                                "token_ids": seq.token_ids, "logprobs": logprobs,
                                "finish_reason": seq.finish_reason})  # fmt: skip
        return {"object": "text_completion", "model": self.model_name, "choices": choices}

    def init_weight_transfer(self, body: dict):
        info = body["init_info"]
        self.channel = join(info, rank=int(info.get("rank_offset", 1)))  # blocks until the trainer joins
        return {}

    def update_weights(self, body: dict):
        info = body["update_info"]
        tensors = [
            (name, self.channel.receive(dtype, shape))
            for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"], strict=True)
        ]
        self.engine.load_weights(tensors)
        self.weight_updates += 1
        return {}

    def weights(self, body: dict) -> bytes:
        from safetensors.torch import save

        return save(self.engine.state_dict())


def make_handler(server: StandInServer):
    routes = server.routes()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str):
            handler = routes.get((method, urlparse(self.path).path))
            if handler is None:
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"the vLLM stand-in has no {method} {self.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            try:
                result = handler(body)
            except (ValueError, KeyError, NotImplementedError) as error:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": f"{type(error).__name__}: {error}"})
            self._reply(HTTPStatus.OK, result)

        def _reply(self, status, result):
            data = result if isinstance(result, bytes) else json.dumps(result).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if isinstance(result, bytes) else
                             "application/json")  # fmt: skip
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):
            pass

    return Handler


def serve(model: str, port: int, seed: int = 0, dtype: str = "auto") -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(StandInServer(model, seed, dtype)))
    httpd.daemon_threads = True
    print(f"vLLM stand-in serving {model} on http://127.0.0.1:{port}", flush=True)
    httpd.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="e.g. bfloat16: a sampler less precise than the trainer")
    args = parser.parse_args()
    serve(args.model, args.port, args.seed, args.dtype)


if __name__ == "__main__":
    main()
