#!/usr/bin/env python
"""Train the project's default model: a small BLIP-2 (ViT + Q-Former with 32 queries + OPT) on easy-VQA.

    python scripts/train_easyvqa.py                      # ~13 min on 2 CPU cores → models/blip2-easyvqa/
    python scripts/train_easyvqa.py --steps 5 --out /tmp/smoke   # smoke test

Generative language-model loss on the runtime's own prompt: ``Question: {q} Answer: {a}`` + EOS, the loss on the
answer tokens and EOS only. A word-level tokenizer is built with ``tokenizers`` from the training split. The init
traps of papers.md are handled: the vision tower's ``initializer_range`` (default 1e-10) is set to 0.02, and the
query tokens (initialised to zero by HF) are drawn at random, otherwise the image path never learns.
The result is saved with ``save_pretrained`` (model + processor) with a model card.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from export.defaults import DEFAULT_MODEL
from export.easyvqa_training import count_correct, load_split, pad_examples, start_run, train, training_record, write_record
from runtime.pipelines.base import left_pad

PROMPT = "Question: {} Answer:"
IMAGE_SIZE = 64  # easy-VQA images are 64 × 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="train_easyvqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=float, default=7.0)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--max-minutes", type=float, default=14.0, help="stop training after this long, whatever the epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=None, help="test questions for the final check (default: all)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data


def build_tokenizer(texts):
    """Lowercase word-level tokenizer over the words of ``texts``; ``</s>`` is BOS and EOS (as in OPT) and is
    prepended by the post-processor."""
    from export.tiny import build_word_tokenizer, words_in

    return build_word_tokenizer(words_in(texts), extra=())


def build_model(tokenizer, seed: int):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.02),
        qformer_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=96, cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dropout=0.0),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)  # HF initialises them to zero: every query would be identical
    return model


def encode_examples(tokenizer, questions, answers):
    """ids = BOS + prompt + answer + EOS; labels mark the answer and EOS (the loss is on those only)."""
    rows = []
    for question, answer in zip(questions, answers):
        prompt_ids = tokenizer(PROMPT.format(question)).input_ids
        answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, len(prompt_ids)))
    return pad_examples(rows, tokenizer.pad_token_id)


def pixel_table(paths: dict, image_processor) -> tuple[np.ndarray, dict]:
    """Every image of the split preprocessed once: (num_images, 3, H, W) and image_id → row."""
    from PIL import Image

    ids = sorted(paths)
    pixels = image_processor([Image.open(paths[i]) for i in ids], return_tensors="np")["pixel_values"].astype(np.float32)
    return pixels, {image_id: row for row, image_id in enumerate(ids)}


# ------------------------------------------------------------------------------------------------ model


def forward_loss(model, pixel_values, input_ids, attention_mask, labels):
    """Teacher-forced LM loss: [32 query embeds][text]; positions follow the mask (queries 0…31, text 32 + t)."""
    import torch
    import torch.nn.functional as F

    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    query_embeds = model.language_projection(query_output)  # (B, Q, E)
    lm = model.language_model
    text_embeds = lm.get_input_embeddings()(input_ids)  # (B, T, E)
    num_queries = query_embeds.shape[1]
    embeds = torch.cat([query_embeds, text_embeds], dim=1)  # (B, Q + T, E)
    mask = torch.cat([torch.ones(input_ids.shape[0], num_queries, dtype=attention_mask.dtype), attention_mask], dim=1)
    logits = lm(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q + T, V)
    predictions = logits[:, num_queries - 1 : -1]  # position i predicts text token i
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), labels.reshape(-1), ignore_index=-100)


def greedy_accuracy(model, tokenizer, pixels, rows, questions, answers, batch_size=256, max_new_tokens=4) -> float:
    """Exact-match accuracy of greedy answers (PyTorch, unpruned) — a check at the end of training."""
    import torch

    correct = 0
    lm = model.language_model
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            batch_q = questions[start : start + batch_size]
            prompts = [tokenizer(PROMPT.format(q)).input_ids for q in batch_q]
            ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, tokenizer.pad_token_id))  # (B, T) each
            pixel_values = torch.from_numpy(pixels[rows[start : start + batch_size]])
            image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
            queries = model.query_tokens.expand(len(prompts), -1, -1)
            query_embeds = model.language_projection(
                model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
            )
            embeds = torch.cat([query_embeds, lm.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(len(prompts), query_embeds.shape[1], dtype=torch.long), mask], dim=1)
            output = lm.generate(inputs_embeds=embeds, attention_mask=full_mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            correct += count_correct(tokenizer, output.tolist(), answers[start : start + batch_size])
    return correct / len(questions)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rng, started, say = start_run(args)

    questions, answers, image_ids, paths = load_split("train")
    test_q, test_a, test_ids, test_paths = load_split("test")
    tokenizer = build_tokenizer([PROMPT.format(q) for q in questions] + answers)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=32)
    model = build_model(tokenizer, args.seed)
    model.config._attn_implementation = "sdpa"  # fast for training; export loads the checkpoint with eager attention
    say(f"{len(questions)} train questions, vocabulary {len(tokenizer)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    pixels, row_of = pixel_table(paths, image_processor)
    image_rows = np.array([row_of[i] for i in image_ids])
    input_ids, mask, labels = encode_examples(tokenizer, questions, answers)
    say(f"preprocessed {len(pixels)} images")

    steps_per_epoch = math.ceil(len(questions) / args.batch_size)  # an "epoch" is this many batches (sampled, balanced)
    total_steps = args.steps or int(args.epochs * steps_per_epoch)

    def loss_of(batch):
        width = int(mask[batch].sum(1).max())
        return forward_loss(
            model,
            torch.from_numpy(pixels[image_rows[batch]]),
            torch.from_numpy(input_ids[batch, :width]),
            torch.from_numpy(mask[batch, :width]),
            torch.from_numpy(labels[batch, :width]),
        )

    run = train(model, loss_of, answers, total_steps, steps_per_epoch, batch_size=args.batch_size, lr=args.lr, rng=rng,
                max_minutes=args.max_minutes, say=say, started=started)

    test_pixels, test_row_of = pixel_table(test_paths, image_processor)
    subset = np.arange(len(test_q)) if args.eval_limit is None else rng.permutation(len(test_q))[: args.eval_limit]
    accuracy = greedy_accuracy(
        model, tokenizer, test_pixels, np.array([test_row_of[test_ids[i]] for i in subset]),
        [test_q[i] for i in subset], [test_a[i] for i in subset],
    )
    say(f"greedy exact-match accuracy, PyTorch, {len(subset)} test questions: {accuracy:.4f}")

    model.config._attn_implementation = "eager"
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    command = "python scripts/train_easyvqa.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    training = training_record(command, args, run, len(subset), accuracy)
    write_record(args.out, training)
    write_card(args.out, training)
    say(f"saved {args.out}")
    return 0


def write_card(folder: Path, training: dict) -> None:
    (folder / "README.md").write_text(f"""# blip2-easyvqa — the default model of vtprune

A small BLIP-2 (`Blip2ForConditionalGeneration`: ViT 3×96 on 64×64 px with 8 px patches → 65 image tokens,
Q-Former 2×96 with **32 query tokens** and cross-attention in every layer, OPT 2×128), trained from scratch on
easy-VQA so that the project has a default model that really answers. Weights: random init (vision
`initializer_range` 0.02, random query tokens), all parts trained jointly.

- Training command: `{training['command']}`
- Data: {training['data']}. easy-VQA: MIT licence, © Victor Zhou (github.com/vzhou842/easy-VQA).
- Objective: generative language-model loss on `Question: {{q}} Answer: {{a}}` + EOS (loss on the answer and EOS),
  with the runtime's own prompt template; word-level tokenizer (`tokenizers`) built from the training split.
  Curriculum: 20% of the steps on shape questions alone, 10% on color questions alone, then half the natural mix
  and half balanced over answer kinds (yes/no, color, shape); on the natural mix alone shapes are never learned
  (`curriculum()` in `export/easyvqa_training.py` lists the runs that led here).
- Seed {training['seed']}, {training['steps']} steps of batch {training['batch_size']}, AdamW lr {training['lr']} (warm-up + cosine),
  {training['threads']} CPU threads, {training['train_minutes']} minutes; final training loss {training['final_loss']}.
- Accuracy (greedy, exact match, PyTorch, unpruned) on {training['test_questions']} easy-VQA test questions:
  **{100 * training['test_accuracy_torch_greedy']:.2f}%**. The accuracy through the ONNX Runtime pipeline at every pruning
  ratio is in the project README (`scripts/results/`).
""")


if __name__ == "__main__":
    sys.exit(main())
