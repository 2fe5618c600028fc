"""Tiny randomly initialised BLIP-2 checkpoints (model + processor, written with ``save_pretrained``).

Used by the tests and, until a trained default model ships, by ``build.py`` when no ``--model`` is given.
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
    seed: int = 0


def build_word_tokenizer(words=WORDS):
    """A lowercase word-level tokenizer that adds ``</s>`` in front, as OPT's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in list(words) + ["?", ":", ",", ".", "!"] + [str(d) for d in range(10)]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_blip2(folder: str | Path, spec: TinyBlip2Spec = TinyBlip2Spec(), tokenizer=None) -> Path:
    """Write a tiny ``Blip2ForConditionalGeneration`` (OPT) + ``Blip2Processor`` to ``folder``."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = Path(folder)
    tokenizer = tokenizer or build_word_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=spec.num_queries)
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
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)  # zero-initialised queries would all be identical
        for module in model.modules():  # LayerNorms at (1, 0) make every Q-Former output the same norm (l2 ties)
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
