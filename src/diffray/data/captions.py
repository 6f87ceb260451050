"""Caption handling trainers of the kohya family expect: a trigger word prepended to every caption, and
per-step shuffling of comma-separated tags with the first `keep_tokens` tags held in place.

The shuffle works on token ids (tags are the runs between comma tokens), so it applies to the token
ids a dataset or latent cache already holds, and it is keyed by (seed, step, sample_id): a resumed run
sees the same caption order at every step, whichever worker a row lands on. Pure numpy; never imports
ray or torch.
"""

from __future__ import annotations

import numpy as np

SHUFFLE_KEY = 104_729  # keeps the tag draws apart from the crop/flip draws of the same (seed, sample)


def with_trigger(caption: str, trigger_word: str | None) -> str:
    """`caption` with the trigger word as its first tag ("sks, a photo of ..."); unchanged without one."""
    if not trigger_word:
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def comma_token_id(tokenizer) -> int:
    """The id of the comma that separates tags; ValueError when the tokenizer splits ',' in several."""
    ids = tokenizer(",", add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes ',' as {len(ids)} tokens; data.shuffle_tags needs one")
    return int(ids[0])


def shuffle_tags(ids: np.ndarray, comma: int, end: int, keep_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """One row of token ids [L] (begin token first, `end` after the caption, padding after it) with the
    comma-separated tags after the first `keep_tokens` permuted; same length, same tokens."""
    ids = np.asarray(ids)
    stop = next((i for i in range(1, len(ids)) if ids[i] == end), len(ids))
    body = list(ids[1:stop])
    tags, tag = [], []
    for t in body:
        if t == comma:
            tags.append(tag)
            tag = []
        else:
            tag.append(t)
    tags.append(tag)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = [rest[i] for i in rng.permutation(len(rest))]
    joined = [t for k, tag in enumerate(fixed + order) for t in ([comma] if k else []) + tag]
    out = ids.copy()
    out[1:stop] = joined
    return out


def shuffle_batch(input_ids: np.ndarray, sample_ids, step: int, seed: int, comma: int, end: int,
                  keep_tokens: int) -> np.ndarray:
    """`shuffle_tags` over a batch [B, L], each row keyed by (seed, step, sample_id)."""
    return np.stack([shuffle_tags(row, comma, end, keep_tokens,
                                  np.random.default_rng((seed, step, int(sid), SHUFFLE_KEY)))
                     for row, sid in zip(input_ids, sample_ids)])
