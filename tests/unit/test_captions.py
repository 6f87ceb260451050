"""Caption handling without Ray: the trigger word is the first tag of every caption; shuffle_tags permutes
the tags after the first keep_tokens, keyed by (seed, step, sample_id) so a resumed run sees the same
captions; keep_tokens without shuffle_tags is a config error naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffray.data.captions import comma_token_id, shuffle_batch, with_trigger
from diffray.data.pipeline import load_tokenizer, preprocess_batch, tokenize_captions
from diffray.data.validate import Rules
from diffray.errors import ConfigError
from diffray.methods import load_config

REPO = Path(__file__).resolve().parents[2]
CAPTION = "sks, red cube, blue ball, green cone, big, small, shiny"


def tags_of(tokenizer, ids: np.ndarray) -> list[str]:
    return [t.strip() for t in tokenizer.decode(ids, skip_special_tokens=True).split(",")]


def test_shuffle_keeps_the_first_tags_permutes_the_rest_and_repeats_on_resume(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    ids = tokenize_captions(tok, [CAPTION] * 2)
    want = tags_of(tok, ids[0])
    assert want == [t.strip() for t in CAPTION.split(",")]  # the tokenizer round-trips the tags
    comma, end = comma_token_id(tok), tok.eos_token_id
    orders = set()
    for step in range(1, 9):
        out = shuffle_batch(ids, [5, 6], step, 0, comma, end, keep_tokens=2)
        assert out.shape == ids.shape and sorted(out[0].tolist()) == sorted(ids[0].tolist())
        for row in out:
            got = tags_of(tok, row)
            assert got[:2] == want[:2] and sorted(got[2:]) == sorted(want[2:])
            orders.add(tuple(got))
        # A resumed run redraws the same order for the same (seed, step, sample): no RNG state to save.
        np.testing.assert_array_equal(out, shuffle_batch(ids, [5, 6], step, 0, comma, end, keep_tokens=2))
    assert len(orders) > 8  # steps and samples get different orders
    other_seed = {tuple(tags_of(tok, r)) for s in range(1, 9) for r in shuffle_batch(ids, [5, 6], s, 1, comma, end, 2)}
    assert other_seed != orders
    # keep_tokens=0 moves the first tag too (somewhere in 16 draws).
    firsts = {tags_of(tok, r)[0] for s in range(1, 9) for r in shuffle_batch(ids, [5, 6], s, 0, comma, end, 0)}
    assert len(firsts) > 1


def test_trigger_word_is_the_first_tag_of_every_trained_caption(tiny_model_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    batch = {"sample_id": np.array([0, 1]), "source": np.array(["a.png", "b.png"], dtype=object),
             "caption": np.array(["red cube, big", None], dtype=object), "error": np.array(["", ""], dtype=object),
             "image": np.array([buf.getvalue()] * 2, dtype=object)}
    out = preprocess_batch(batch, tiny_model_path, 32, True, False, 0, Rules(default_caption="a toy"),
                           trigger_word="sks")
    tok = load_tokenizer(tiny_model_path)
    assert [tags_of(tok, r) for r in out["input_ids"]] == [["sks", "red cube", "big"], ["sks", "a toy"]]
    assert with_trigger("", "sks") == "sks" and with_trigger("a b", None) == "a b"


def test_a_flipped_image_gets_its_caption_mirrored(tiny_model_path):
    """random_flip draws per sample; every sample drawn flipped (its red half now on the right) reads "right"
    where its caption said "left", and the others keep their caption (planted bug: captions left as they
    were, as before, so a flipped "on the left" taught the wrong side)."""
    import io

    from PIL import Image

    from diffray.data.transforms import mirror_caption

    img = Image.new("RGB", (64, 64), "blue")
    img.paste((255, 0, 0), (0, 0, 32, 64))  # red on the left half
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    n = 16
    caption = "a red square on the left on a blue background"
    batch = {"sample_id": np.arange(n), "source": np.array([f"{i}.png" for i in range(n)], dtype=object),
             "caption": np.array([caption] * n, dtype=object), "error": np.array([""] * n, dtype=object),
             "image": np.array([buf.getvalue()] * n, dtype=object)}
    out = preprocess_batch(batch, tiny_model_path, 32, True, True, 0, Rules())
    flipped = out["pixel_values"][:, 0, :, -1].mean(axis=1) > 0  # red (channel 0 high) on the right edge
    assert 0 < flipped.sum() < n
    tok = load_tokenizer(tiny_model_path)
    words = [tok.decode(r, skip_special_tokens=True).split() for r in out["input_ids"]]
    assert all(("right" in w) == f and ("left" in w) != f for w, f in zip(words, flipped)), (words, flipped)
    assert mirror_caption("Left of the RIGHT bright leftover, left") == "Right of the LEFT bright leftover, right"


def test_keep_tokens_needs_shuffle_tags():
    with pytest.raises(ConfigError, match="keep_tokens"):
        load_config(REPO / "configs" / "lora.yaml", ["data.keep_tokens=1"])
    cfg = load_config(REPO / "configs" / "lora.yaml", ["data.shuffle_tags=true", "data.keep_tokens=1",
                                                       "data.trigger_word=sks"])
    assert (cfg.data.shuffle_tags, cfg.data.keep_tokens, cfg.data.trigger_word) == (True, 1, "sks")
