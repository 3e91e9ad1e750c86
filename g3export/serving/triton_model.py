"""The Triton Python-backend model `gemma3` (decoupled): runs the scheduler over a build and
streams one response per generated token. Loaded by the repository's model.py (written by
g3export.serving.repo), inside Triton's Python backend stub, where triton_python_backend_utils
exists.

* initialize: opens the build named by the `build_dir` parameter (a relative path is taken from
  the model's directory), a session of `max_batch` slots, and starts the scheduler's thread.
* Triton's /generate endpoint takes exactly one response: a request with the optional input
  `stream` false gets one (every token, FINAL); streaming is the default (generate_stream).
* execute: for each request, parses it (g3export.serving.requests) and submits it; a bad request
  gets one error response (pb_utils.TritonError, one line) with the FINAL flag and the others go
  on. A thread per request turns the scheduler's events into responses: `text_output` (the new
  text, decoded incrementally so a character split over tokens comes out whole) and `output_ids`
  (the token). The stream ends with an empty response flagged FINAL, after any text the decoder
  still held. When the client goes away (Triton marks the request cancelled) the scheduler's
  stream is cancelled, which frees its slot.
* finalize: closes the scheduler (every open stream ends) and waits for the senders.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

from ..errors import UserError
from ..runtimes.scheduler import Scheduler
from .requests import RequestError, parse_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INPUTS = ("text_input", "input_ids", "chat_template", "image", "max_tokens", "temperature",
          "top_k", "top_p", "seed", "stream")


def open_session(build_dir: Path, max_batch: int, provider: str):
    """The session the scheduler runs over (its cache holds `max_batch` sequence slots, each row
    at its own position), and the tokenizer."""
    from ..runtimes.loader import open_build

    return open_build(build_dir, provider=provider, batch=max_batch)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        build_dir = Path(params["build_dir"])
        if not build_dir.is_absolute():
            build_dir = Path(args["model_repository"]) / build_dir
        self.session, self.tokenizer = open_session(build_dir, int(params.get("max_batch", 8)),
                                                    params.get("provider", "cpu"))
        self.default_max_tokens = int(params.get("default_max_tokens", 128))
        self.scheduler = Scheduler(self.session, max_queue=int(params.get("max_queue", 64)),
                                   prefill_chunk=int(params.get("prefill_chunk", 512)))
        self.scheduler.start()
        self.senders: set[threading.Thread] = set()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in INPUTS:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is not None:
                        inputs[name] = t.as_numpy()
                req = parse_request(inputs, self.tokenizer, self.session.config,
                                    self.default_max_tokens, self.session.image_features)
                stream = self.scheduler.submit(req)
                streaming = bool(np.asarray(inputs.get("stream", [True])).reshape(-1)[0])
            except (UserError, ValueError) as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    " ".join(str(e).split()))), flags=FINAL)
                continue
            except Exception as e:  # noqa: BLE001 - a bug must not take the other requests down
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"internal error: {type(e).__name__}: {e}")), flags=FINAL)
                continue
            th = threading.Thread(target=self._send, args=(stream, sender, streaming),
                                  daemon=True)
            self.senders.add(th)
            th.start()
        return None

    def _send(self, stream, sender, streaming: bool = True) -> None:
        """Events -> responses: one per token, or (streaming false: what /generate needs) one
        response holding every token, flagged FINAL. A client that has gone away (Triton marks
        the request cancelled, or a send fails) cancels the stream, which frees its slot; the
        events are read to the end either way."""
        decoder = self.tokenizer.stream() if self.tokenizer is not None else None
        texts, ids, gone = [], [], False

        def send(response=None, flags=0) -> None:
            nonlocal gone
            if gone and not flags:  # the FINAL flag is always sent: it releases the request
                return
            try:
                if response is None:
                    sender.send(flags=flags)
                else:
                    sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - the request is gone; stop generating for it
                gone = True
                stream.cancel()

        try:
            for ev in stream:
                if not gone and sender.is_cancelled():
                    gone = True
                    stream.cancel()
                if ev.finish_reason == "error":
                    send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        " ".join((ev.error or "generation failed").split()))), FINAL)
                    return
                if ev.token_id is not None:
                    text = decoder.feed(ev.token_id) if decoder is not None else ""
                    if streaming:
                        send(_response(text, [ev.token_id]))
                    else:
                        texts.append(text)
                        ids.append(ev.token_id)
                elif decoder is not None:
                    rest = decoder.flush()
                    if rest and streaming:
                        send(_response(rest, []))
                    texts.append(rest)
            if streaming:
                send(flags=FINAL)
            else:
                send(_response("".join(texts), ids), FINAL)
        finally:
            self.senders.discard(threading.current_thread())

    def finalize(self):
        self.scheduler.close()
        for th in list(self.senders):
            th.join(timeout=5)


def _response(text: str, ids: list[int]):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64))])
