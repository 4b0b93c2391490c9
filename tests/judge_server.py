"""A real OpenAI-compatible `/v1/completions` server on 127.0.0.1, backed by a local model.

It speaks the wire format vLLM and hosted servers use: `prompt` (a string or a list), `max_tokens`,
`logprobs` (how many top log-probs per token), and replies with `choices[i].text` and
`choices[i].logprobs.top_logprobs`. Tokens that decode to the same text are merged, as a server
that keys its reply by token text must. `fail_after` makes it answer 503 after that many
requests, to test what a client does when its judge goes away.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class JudgeServer:
    def __init__(self, model_path: str, api_key: str | None = None):
        from align.config import JudgeSpec
        from align.judge import LocalJudge

        self.backend = LocalJudge(JudgeSpec(model=model_path))
        self.api_key = api_key
        self.requests = 0
        self.fail_after: int | None = None
        self.seen_keys: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                server.requests += 1
                server.seen_keys.append(self.headers.get("Authorization"))
                if server.fail_after is not None and server.requests > server.fail_after:
                    return self._reply(503, {"error": "overloaded"})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._reply(401, {"error": "bad key"})
                if self.path != "/v1/completions":
                    return self._reply(404, {"error": "not found"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(200, server.complete(body))

            def _reply(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def complete(self, body: dict) -> dict:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        if body.get("max_tokens", 16) > 1:
            texts = self.backend.complete(prompts, body["max_tokens"])
            return {"object": "text_completion", "choices": [{"index": i, "text": t, "logprobs": None} for i, t in enumerate(texts)]}
        tokenizer, model = self.backend.tokenizer, self.backend.model
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            merged: dict[str, float] = {}
            for token_id in torch.argsort(logprobs, descending=True)[: int(body.get("logprobs") or 0)].tolist():
                text = tokenizer.decode([token_id])
                value = logprobs[token_id].item()
                merged[text] = math.log(math.exp(merged[text]) + math.exp(value)) if text in merged else value
            best = max(merged, key=merged.get) if merged else ""
            choices.append({"index": index, "text": best, "logprobs": {"tokens": [best], "top_logprobs": [merged]}})
        return {"object": "text_completion", "choices": choices}

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
