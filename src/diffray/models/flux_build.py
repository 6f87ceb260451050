"""The Flux presets' parts built by our code (`diffray.models.tiny` calls this): the T5 tokenizer and
`FluxPipeline`'s components at random. Never imports Ray or the model loaders."""

from __future__ import annotations

T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.-'!?:;()"  # the tiny T5's pieces


def t5_tokenizer(model_max_length: int, vocab_size: int | None = None):
    """A character-level T5 tokenizer (SentencePiece-style Unigram over letters, digits and punctuation,
    `</s>` appended, `<pad>` = 0; padded with unused pieces to `vocab_size`), built by our code: the Flux
    presets' `tokenizer_2`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list(T5_CHARS)
    vocab = [(t, 0.0) for t in T5_SPECIALS] + [("\u2581", -1.0)] + [(c, -2.0) for c in chars] + \
        [("\u2581" + c, -2.5) for c in chars]
    vocab += [(f"<unused{i}>", -100.0) for i in range((vocab_size or 0) - len(vocab))]  # T5's table size
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def build_flux_components(cfgs: dict, clip_tokenizer, clip_config) -> dict:
    """`FluxPipeline`'s components from a preset's configs (random weights; the caller seeds the RNG)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer_2 = t5_tokenizer(**cfgs["tokenizer_2"])
    t5 = T5Config(vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id,
                  eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, **cfgs["text_encoder_2"])
    return dict(transformer=FluxTransformer2DModel(**cfgs["transformer"]), vae=AutoencoderKL(**cfgs["vae"]),
                text_encoder=CLIPTextModel(clip_config), tokenizer=clip_tokenizer,
                text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(cfgs["scheduler"]))
