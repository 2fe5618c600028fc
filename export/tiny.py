"""Tiny randomly initialised BLIP-2 and Mllama checkpoints (model + processor, written with ``save_pretrained``),
and the lowercase word-level tokenizer they use (``scripts/train_easyvqa.py`` builds the default model's with it).

Used by the tests.
The init traps of papers.md are handled: the vision tower's ``initializer_range`` defaults to 1e-10 (uniform
attention, every score tied) and the query tokens start at zero (every query identical), so both are
re-initialised here; LayerNorm weights are drawn around (1, 0) so that token norms differ (``l2`` would tie).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "question answer what color is the shape a an of in image picture this there does contain "
    "circle square triangle rectangle red blue green yellow gray grey black brown teal white orange "
    "yes no not how many shapes which side left right top bottom"
).split()
PUNCTUATION_AND_DIGITS = ("?", ":", ",", ".", "!", *(str(d) for d in range(10)))


# ------------------------------------------------------------------------------------------------ word tokenizer


def _word_splitting():
    """(normalizer, pre-tokenizer) of the word-level tokenizers: lowercase, split on white space and punctuation."""
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def words_in(texts) -> list[str]:
    """The words of ``texts`` as the word-level tokenizer splits them, in order of appearance (repeats included)."""
    normalizer, pre_tokenizer = _word_splitting()
    return [word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def _word_level(vocab: dict[str, int]):
    """A ``tokenizers.Tokenizer`` over ``vocab``, one id per lowercase word; unknown words are ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _word_splitting()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tokenizer


def build_word_tokenizer(words=WORDS, extra=PUNCTUATION_AND_DIGITS):
    """A lowercase word-level tokenizer over ``words`` then ``extra`` that adds ``</s>`` in front, as OPT's does
    (``</s>`` is BOS and EOS)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in [*words, *extra]:
        vocab.setdefault(word, len(vocab))
    tokenizer = _word_level(vocab)
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------------------ BLIP-2


@dataclass(frozen=True)
class TinyBlip2Spec:
    image_size: int = 32
    patch_size: int = 8
    vision_layers: int = 2
    vision_heads: int = 4
    vision_hidden: int = 32
    num_queries: int = 8
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_hidden: int = 32
    cross_attention_frequency: int = 1
    lm_layers: int = 2
    lm_heads: int = 4
    lm_hidden: int = 32
    weight_scale: float = 1.0  # every Linear weight multiplied by this: larger activations (parity calibration tests)
    seed: int = 0


def make_tiny_blip2(folder: str | Path, spec: TinyBlip2Spec = TinyBlip2Spec(), tokenizer=None) -> Path:
    """Write a tiny ``Blip2ForConditionalGeneration`` (OPT) + ``Blip2Processor`` to ``folder``."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    folder = Path(folder)
    tokenizer = tokenizer or build_word_tokenizer()
    processor = blip2_processor(tokenizer, spec.image_size, spec.num_queries)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    config = Blip2Config(
        vision_config=dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            initializer_range=0.02,  # the default 1e-10 makes every attention uniform
        ),
        qformer_config=dict(
            hidden_size=spec.qformer_hidden,
            intermediate_size=spec.qformer_hidden * 2,
            num_hidden_layers=spec.qformer_layers,
            num_attention_heads=spec.qformer_heads,
            encoder_hidden_size=spec.vision_hidden,
            cross_attention_frequency=spec.cross_attention_frequency,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=spec.lm_hidden,
            ffn_dim=spec.lm_hidden * 2,
            num_hidden_layers=spec.lm_layers,
            num_attention_heads=spec.lm_heads,
            max_position_embeddings=128,
            word_embed_proj_dim=spec.lm_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=spec.num_queries,
        image_token_index=image_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Blip2ForConditionalGeneration(config).eval()
    fix_blip2_init(model, spec.weight_scale)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def blip2_processor(tokenizer, image_size: int, num_queries: int):
    """``Blip2Processor`` over ``tokenizer`` (which it gives an ``<image>`` token) with a square ``image_size``
    resize and BLIP's defaults (bicubic, CLIP mean/std)."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_queries)


def fix_blip2_init(model, weight_scale: float = 1.0) -> None:
    """The init traps of a random BLIP-2, fixed in place (query tokens, LayerNorms; see the module docstring)."""
    import torch

    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)  # zero-initialised queries would all be identical
        for module in model.modules():  # LayerNorms at (1, 0) make every Q-Former output the same norm (l2 ties)
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, torch.nn.Linear) and weight_scale != 1.0:
                module.weight.mul_(weight_scale)


# ------------------------------------------------------------------------------------------------ Mllama

MLLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<unk>")
MLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyMllamaSpec:
    image_size: int = 56  # tile size
    patch_size: int = 14
    max_num_tiles: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_global_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    cross_attention_layers: tuple[int, ...] = (1, 3)
    text_heads: int = 4
    text_kv_heads: int = 2
    chat_template: bool = False
    seed: int = 0


def build_mllama_tokenizer(words=WORDS):
    """Word-level tokenizer with Llama-3's special tokens; ``<|image|>`` takes the last id (= the text vocabulary
    size, as in the real model). It adds no BOS itself: ``MllamaProcessor`` inserts ``<|begin_of_text|>``."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*MLLAMA_SPECIALS, *words, *PUNCTUATION_AND_DIGITS]:
        vocab.setdefault(token, len(vocab))
    vocab["<|image|>"] = len(vocab)
    tokenizer = _word_level(vocab)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*MLLAMA_SPECIALS, "<|image|>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", unk_token="<unk>", extra_special_tokens={"image_token": "<|image|>"},
        padding_side="left",
    )


def mllama_config(spec: TinyMllamaSpec, tokenizer):
    """``MllamaConfig`` of ``spec`` over ``tokenizer`` (built by :func:`build_mllama_tokenizer`): ``<|image|>`` is the
    text vocabulary size, as in the real model."""
    from transformers import MllamaConfig

    text_vocab = tokenizer.convert_tokens_to_ids("<|image|>")
    indices = [0, 1] if spec.vision_layers >= 2 else [0]
    return MllamaConfig(
        vision_config=dict(
            image_size=spec.image_size, patch_size=spec.patch_size, max_num_tiles=spec.max_num_tiles,
            hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
            num_global_layers=spec.vision_global_layers, attention_heads=spec.vision_heads,
            intermediate_layers_indices=indices, vision_output_dim=spec.vision_hidden * (1 + len(indices)),
            initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=text_vocab, hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=spec.text_layers, cross_attention_layers=list(spec.cross_attention_layers),
            num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=text_vocab,
    )


def make_tiny_mllama(folder: str | Path, spec: TinyMllamaSpec = TinyMllamaSpec()) -> Path:
    """Write a tiny ``MllamaForConditionalGeneration`` + ``MllamaProcessor`` to ``folder``.

    Init traps (papers.md) handled: the cross-attention gates and the tile/aspect-ratio embedding gates start at 0
    (the image would not matter), so they are set non-zero; the projector is redrawn at std 0.1 so that different
    images give different answers.
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    tokenizer = build_mllama_tokenizer()
    config = mllama_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = MllamaForConditionalGeneration(config).eval()
    fix_mllama_init(model)
    folder = Path(folder)
    model.save_pretrained(folder)
    mllama_processor(tokenizer, spec.image_size, spec.max_num_tiles, spec.chat_template).save_pretrained(folder)
    return folder


def fix_mllama_init(model) -> None:
    """The init traps of a random Mllama, fixed in place: non-zero gates, a projector redrawn at std 0.1."""
    import math

    import torch

    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            if kind == "MllamaCrossAttentionDecoderLayer":
                module.cross_attn_attn_gate.fill_(1.0)
                module.cross_attn_mlp_gate.fill_(1.0)
            elif kind in ("MllamaPrecomputedAspectRatioEmbedding", "MllamaPrecomputedPositionEmbedding"):
                module.gate.fill_(0.5)
            elif kind == "MllamaVisionEncoderLayer" and module.is_gated:
                module.gate_attn.fill_(math.pi / 4)
                module.gate_ffn.fill_(math.pi / 4)
        model.model.multi_modal_projector.weight.normal_(0.0, 0.1)
    model.generation_config.do_sample = False


def mllama_processor(tokenizer, image_size: int, max_tiles: int, chat_template: bool = False):
    """``MllamaProcessor`` over ``tokenizer``: square tiles of ``image_size``, up to ``max_tiles``, CLIP mean/std."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(
        size={"height": image_size, "width": image_size}, max_image_tiles=max_tiles,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=MLLAMA_CHAT_TEMPLATE if chat_template else None)
