"""An independent PyTorch implementation of papers.md's CATP on a HF BLIP-2, and HF's own generation.

Nothing here imports the project's ``export`` package: attentions come from HF's ``output_attentions`` and the
voting is plain loops, so agreement with the engines is evidence, not a tautology.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration


@lru_cache(maxsize=8)
def load(model_dir: str):
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def vote(cross_attentions: list[np.ndarray], layer_weights: list[float]) -> np.ndarray:
    """score[b, q] = Σ_l w_l Σ_h Σ_j rank of A_l[b, h, q, j] among the queries (stable: ties → lower index lower)."""
    batch, heads, queries, patches = cross_attentions[0].shape
    score = np.zeros((batch, queries))
    for weight, probs in zip(layer_weights, cross_attentions):
        for b in range(batch):
            for h in range(heads):
                for j in range(patches):
                    for rank, q in enumerate(np.argsort(probs[b, h, :, j], kind="stable")):
                        score[b, q] += weight * rank
    return score


def keep_set(score_row: np.ndarray, k: int) -> set[int]:
    return set(sorted(range(len(score_row)), key=lambda q: (-score_row[q], q))[:k])


@torch.no_grad()
def catp_kept_sets(model_dir: str | Path, image, k: int, layer_weights: list[float] | None = None) -> tuple[set[int], np.ndarray]:
    model, processor = load(str(model_dir))
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    outputs = model.qformer(
        query_embeds=model.query_tokens.expand(1, -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        output_attentions=True,
    )
    cross = [a.numpy() for a in outputs.cross_attentions]
    weights = layer_weights or [1.0] * len(cross)
    score = vote(cross, weights)
    return keep_set(score[0], k), score[0]


@torch.no_grad()
def hf_answer_ids(model_dir: str | Path, image, prompt: str, kept: list[int] | None, max_new_tokens: int) -> list[int]:
    """HF's own greedy tokens: ``Blip2ForConditionalGeneration.generate`` unpruned (kept=None), else the language
    model's ``generate`` fed the kept (projected) query outputs followed by the text embeddings."""
    model, processor = load(str(model_dir))
    kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    if kept is None:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        output = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:]
    else:
        pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        query_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output  # (1, Q, E) projected
        query_embeds = query_embeds[:, sorted(kept)]
        text_ids = torch.tensor([processor.tokenizer(prompt).input_ids])
        embeds = torch.cat([query_embeds, model.language_model.get_input_embeddings()(text_ids)], dim=1)
        output = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kwargs
        )[0]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = []
    for token in output.tolist():
        if token in eos:
            break
        tokens.append(token)
    return tokens


def hf_answer(model_dir, image, prompt, kept, max_new_tokens) -> str:
    model, processor = load(str(model_dir))
    return processor.tokenizer.decode(hf_answer_ids(model_dir, image, prompt, kept, max_new_tokens), skip_special_tokens=True).strip()
