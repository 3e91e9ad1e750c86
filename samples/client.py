"""Chat with a running `g3export serve` (or any Triton serving a `g3export triton-repo`) over HTTP,
streaming the answer as server-sent events from /v2/models/gemma3/generate_stream. Standard library
only.

    g3export serve builds/270m --port 8000 &
    python samples/client.py --prompt "Write a haiku about the sea."
    printf 'Hello!\\nWhat did I just say?\\n' | python samples/client.py       # a multi-turn chat
    python samples/client.py --prompt-ids 2,105,2364 --max-tokens 8 --json   # ids in, ids out

Each turn is sent as `text_input`. The first turn goes through the server's chat template; from
the second on, the client sends the whole conversation in Gemma's turn format with
chat_template=false, so the model sees its earlier answers. Errors from the server (a prompt too
long, bad sampling values, a busy server) print one `error: ...` line and exit 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Iterator
from urllib.parse import urlparse


class ServerError(Exception):
    pass


def generate_stream(url: str, body: dict, timeout: float = 600) -> Iterator[dict]:
    """POST body to URL/v2/models/gemma3/generate_stream; yield each event's JSON object. An
    error (HTTP 400 before the first token, or an error event later) raises ServerError. Closing
    the generator closes the connection, which cancels the request on the server."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/gemma3/generate_stream", json.dumps(body),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise ServerError(event["error"])
            yield event
        if resp.status != 200:
            raise ServerError(f"HTTP {resp.status}")
    finally:
        conn.close()


def ids_of(event: dict) -> list[int]:
    ids = event.get("output_ids", [])
    return ids if isinstance(ids, list) else [ids]  # Triton sends a one-element list as a scalar


def turn(role: str, text: str) -> str:
    return f"<start_of_turn>{role}\n{text}<end_of_turn>\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompt", default=None, help="One turn; default: one turn per stdin line.")
    ap.add_argument("--prompt-ids", default=None, help="Comma-separated ids, used as given.")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="Print one JSON object per turn.")
    args = ap.parse_args(argv)
    params = {"max_tokens": args.max_tokens}
    for k in ("temperature", "top_k", "top_p", "seed"):
        if getattr(args, k) is not None:
            params[k] = getattr(args, k)
    if args.prompt_ids is not None:
        turns = [[int(x) for x in args.prompt_ids.split(",") if x.strip()]]
    else:
        turns = [args.prompt] if args.prompt is not None else (l.rstrip("\n") for l in sys.stdin)
    history = ""
    try:
        for user in turns:
            if isinstance(user, list):
                body = {"input_ids": user}
            elif not history:
                body = {"text_input": user}
            else:  # the whole conversation, rendered here in Gemma's turn format
                body = {"text_input": history + turn("user", user) + "<start_of_turn>model\n",
                        "chat_template": False}
            text, ids = [], []
            for event in generate_stream(args.url, {**body, **params}):
                piece = event.get("text_output", "")
                text.append(piece)
                ids += ids_of(event)
                if not args.json:
                    print(piece, end="", flush=True)
            answer = "".join(text)
            if args.json:
                print(json.dumps({"text": answer, "output_ids": ids}), flush=True)
            else:
                print(flush=True)
            if not isinstance(user, list):
                history += turn("user", user) + turn("model", answer)
    except (ServerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
