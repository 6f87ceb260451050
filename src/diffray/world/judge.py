"""The simulated person at the playground (`diffray feedback simulate`): for each prompt of a world suite a
live endpoint draws the same prompt and seed with two models (`POST /v1/generate`; one model twice: two
seeds, as the playground's "two seeds, same model"), the world reader judges
both, and its choice is posted as the playground's compare click would post it (`POST /v1/feedback`: the
image it finds right is preferred; both right is a tie, both wrong both bad). The tallies compare the two
models on the endpoint: the right model's win rate among the pairs with a preference.

Each post carries its own id (this run's nonce and the prompt's index), so a post retried through a 503 or a
dropped connection is stored once. HTTP through `diffray.serve.client` (retries on 503 and connection errors;
endpoints under the base URL's path, as `diffray generate --url` builds them: `endpoint_url`).
"""

from __future__ import annotations

import base64
import io
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from diffray.errors import ConfigError

CHOICE = {(True, False): "left", (False, True): "right", (True, True): "tie", (False, False): "both_bad"}


def judge_endpoint(url: str, left: str, right: str, num: int = 32, suite: str = "prompts", seed: int = 2,
                   steps: int = 25, guidance: float = 5.0, size: int = 64, api_key: str | None = None,
                   post: bool = True, workers: int = 4, timeout: float = 300.0, retry=None) -> dict[str, Any]:
    """Compare `left` and `right` (adapter ids or `base`) on `num` prompts of `suite` drawn by the endpoint at
    `url`; post each verdict as feedback unless `post` is False. Returns the tallies: left/right accuracy,
    wins, ties, both bad, and `right_win_rate` (None when no pair had a preference). `timeout` bounds each
    attempt's wait for an answer; `retry` is the client's `RetryPolicy` (None: its default).

    Raises:
        ConfigError: a suite without plain prompts, bad sizes, a `url` that is no server's base URL or a
            `timeout` that is no finite number of seconds above 0.
        RequestError: the endpoint refused a request (its message and field) or stayed unreachable.
    """
    from diffray.serve.client import check_timeout, endpoint_url, post_json
    from diffray.world.report import score_image
    from diffray.world.suites import CONCEPT_SUITES, build_suite, check_suite

    check_suite(suite, num, None)
    if suite in CONCEPT_SUITES or suite == "controlnet":
        raise ConfigError(f"{suite!r}: the judge compares models on prompt suites (prompts, heldout)", field="suite")
    if not 1 <= workers <= 64:
        raise ConfigError(f"must be 1 to 64, got {workers}", field="workers")
    generate_at, feedback_at = endpoint_url(url, "/v1/generate"), endpoint_url(url, "/v1/feedback")
    timeout = check_timeout(timeout)
    items = build_suite(suite, num, seed, size)
    nonce = uuid.uuid4().hex

    def draw(prompt: str, model: str, item_seed: int) -> str:
        body = {"prompt": prompt, "seed": item_seed, "steps": steps, "guidance": guidance, "width": size,
                "height": size}
        if model != "base":
            body["adapter"] = model
        return post_json(generate_at, body, api_key, timeout=timeout, retry=retry)[0]["images"][0]["b64_json"]

    seeds_of = (lambda s: (s, s + 1)) if left == right else (lambda s: (s, s))  # one model: two seeds

    def one(item) -> tuple[bool, bool]:
        seeds = seeds_of(item.seed)
        pngs = [draw(item.prompt, model, s) for model, s in zip((left, right), seeds)]
        verdict = tuple(bool(score_image(suite, item, Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
                             ["right"]) for b in pngs)
        if post:
            body = {"id": f"sim-{nonce[:16]}-{item.id:06d}", "prompt": item.prompt,
                    "choice": CHOICE[verdict],
                    "images": [{"b64_json": b, "model": m, "seed": s, "steps": steps, "guidance": guidance}
                               for b, m, s in zip(pngs, (left, right), seeds)]}
            post_json(feedback_at, body, api_key, timeout=timeout, retry=retry)
        return verdict  # type: ignore[return-value]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = list(pool.map(one, items))
    kinds = Counter(CHOICE[v] for v in verdicts)
    decided = kinds["left"] + kinds["right"]
    return {"pairs": num, "left": left, "right": right, "suite": suite, "seed": seed, "posted": post,
            "left_accuracy": sum(v[0] for v in verdicts) / num, "right_accuracy": sum(v[1] for v in verdicts) / num,
            "left_wins": kinds["left"], "right_wins": kinds["right"], "ties": kinds["tie"],
            "both_bad": kinds["both_bad"], "right_win_rate": kinds["right"] / decided if decided else None}


def format_tallies(t: dict[str, Any]) -> str:
    rate = "n/a (no pair with a preference)" if t["right_win_rate"] is None else f"{t['right_win_rate']:.1%}"
    return (f"{t['pairs']} pairs of {t['suite']} prompts: {t['left']} right {t['left_accuracy']:.1%}, "
            f"{t['right']} right {t['right_accuracy']:.1%}; {t['left']} preferred {t['left_wins']}, "
            f"{t['right']} preferred {t['right_wins']}, ties {t['ties']}, both bad {t['both_bad']}; "
            f"{t['right']} wins {rate} of the decided pairs" + ("; posted as feedback" if t["posted"] else ""))
