#!/usr/bin/env python
"""Train the project's Mllama default: a small LLaMA-3.2-Vision-style model (tiled vision encoder + text decoder
with cross-attention layers) on easy-VQA, so that Trimmed Llama can be shown on real data.

    python scripts/train_easyvqa_mllama.py                       # ~20 min on 2 CPU cores → models/mllama-easyvqa/
    python scripts/train_easyvqa_mllama.py --steps 5 --eval-limit 16 --out /tmp/smoke   # smoke test

Each 64×64 easy-VQA image becomes 4 tiles of 32×32 px with 4 px patches: 4 × (64 patches + CLS) = **260 visual
tokens** per image, cross-attended by 3 of the 7 text layers (1, 3, 5), so trimming has two later layers to
shrink. Generative loss on the runtime's own prompt, ``<|image|>`` + BOS + ``Question: {q} Answer:`` (as
``MllamaProcessor`` renders the default template), then `` {a}`` + ``<|eot_id|>``; the loss is on the answer and
EOS only. A word-level tokenizer with Llama-3's special tokens is built from the training split. The curriculum over
answer kinds is BLIP-2's (``export/easyvqa_training.py``). Init traps (papers.md) handled as in the tests' tiny
models (``export.tiny.fix_mllama_init``): cross-attention and tile-embedding gates non-zero.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from export.defaults import MLLAMA_MODEL
from export.easyvqa_training import count_correct, load_split, pad_examples, start_run, train, training_record, write_record
from runtime.pipelines.base import left_pad

PROMPT = "Question: {} Answer:"  # after "<|image|><|begin_of_text|>", as the adapter's default template renders
TILE_SIZE, TILES = 32, 4  # a 64×64 easy-VQA image is exactly 2×2 tiles


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="train_easyvqa_mllama.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MLLAMA_MODEL)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop training after this long, whatever the epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=None, help="test questions for the final check (default: all)")
    return parser.parse_args(argv)


def spec():
    from export.tiny import TinyMllamaSpec

    return TinyMllamaSpec(image_size=TILE_SIZE, patch_size=4, max_num_tiles=TILES, vision_hidden=64, vision_layers=2,
                          vision_global_layers=1, vision_heads=4, text_hidden=128, text_layers=7,
                          cross_attention_layers=(1, 3, 5), text_heads=4, text_kv_heads=2)


def build_model(tokenizer, seed: int):
    import torch
    from transformers import MllamaForConditionalGeneration

    from export.tiny import fix_mllama_init, mllama_config

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(mllama_config(spec(), tokenizer))
    fix_mllama_init(model)
    return model


# ------------------------------------------------------------------------------------------------ data


def encode_prompts(tokenizer, questions) -> list[list[int]]:
    """``<|image|>`` BOS ``Question: {q} Answer:`` — the ids MllamaProcessor gives for the default template."""
    head = [tokenizer.convert_tokens_to_ids("<|image|>"), tokenizer.bos_token_id]
    return [head + tokenizer(PROMPT.format(q), add_special_tokens=False).input_ids for q in questions]


def encode_examples(tokenizer, questions, answers):
    """Right-padded ids = prompt + answer + EOS; labels mark the answer and EOS (the loss is on those only)."""
    rows = []
    for prompt_ids, answer in zip(encode_prompts(tokenizer, questions), answers):
        answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, len(prompt_ids)))
    return pad_examples(rows, tokenizer.pad_token_id)


def pixel_table(paths: dict, image_processor) -> tuple[dict, dict]:
    """Every image of the split preprocessed once: pixel_values (I, 1, tiles, 3, H, W), aspect_ratio_ids (I, 1),
    aspect_ratio_mask (I, 1, tiles), and image_id → row."""
    from PIL import Image

    ids = sorted(paths)
    out = image_processor([[Image.open(paths[i]).convert("RGB")] for i in ids], return_tensors="np")
    tables = {name: np.ascontiguousarray(out[name]) for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    tables["pixel_values"] = tables["pixel_values"].astype(np.float32)
    return tables, {image_id: row for row, image_id in enumerate(ids)}


def model_inputs(pixels: dict, rows, input_ids, attention_mask) -> dict:
    """Torch inputs of a batch; every text token from ``<|image|>`` on attends to all tiles (the image is first)."""
    import torch

    batch = {name: torch.from_numpy(table[rows]) for name, table in pixels.items()}
    tiles = pixels["aspect_ratio_mask"].shape[-1]
    cross = np.repeat(attention_mask[:, :, None, None], tiles, axis=3)  # (B, T, 1, tiles)
    return {**batch, "input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "cross_attention_mask": torch.from_numpy(cross)}


def forward_loss(model, inputs: dict, labels: np.ndarray):
    import torch
    import torch.nn.functional as F

    logits = model(**inputs).logits  # (B, T, V)
    targets = torch.from_numpy(labels[:, 1:])  # position t predicts token t + 1
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def greedy_accuracy(model, tokenizer, pixels, rows, questions, answers, batch_size=256, max_new_tokens=4) -> float:
    """Exact-match accuracy of greedy answers (HF generate, PyTorch, unpruned) — a check at the end of training."""
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            ids, mask = left_pad(encode_prompts(tokenizer, questions[start : start + batch_size]), tokenizer.pad_token_id)
            width = ids.shape[1]
            inputs = model_inputs(pixels, rows[start : start + batch_size], ids, mask)
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)[:, width:]
            correct += count_correct(tokenizer, output.tolist(), answers[start : start + batch_size])
    return correct / len(questions)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from export.tiny import build_mllama_tokenizer, mllama_processor, words_in

    hf_logging.set_verbosity_error()
    rng, started, say = start_run(args)

    questions, answers, image_ids, paths = load_split("train")
    test_q, test_a, test_ids, test_paths = load_split("test")
    tokenizer = build_mllama_tokenizer(words_in([PROMPT.format(q) for q in questions] + answers))
    processor = mllama_processor(tokenizer, TILE_SIZE, TILES)
    model = build_model(tokenizer, args.seed)
    model.set_attn_implementation("sdpa")  # fast for training; export loads the checkpoint with eager attention
    say(f"{len(questions)} train questions, vocabulary {len(tokenizer)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    pixels, row_of = pixel_table(paths, processor.image_processor)
    image_rows = np.array([row_of[i] for i in image_ids])
    input_ids, mask, labels = encode_examples(tokenizer, questions, answers)
    say(f"preprocessed {len(row_of)} images: {pixels['pixel_values'].shape[2]} tiles each")

    steps_per_epoch = math.ceil(len(questions) / args.batch_size)  # an "epoch" is this many batches (sampled, balanced)
    total_steps = args.steps or int(args.epochs * steps_per_epoch)

    def loss_of(batch):
        width = int(mask[batch].sum(1).max())
        inputs = model_inputs(pixels, image_rows[batch], input_ids[batch, :width], mask[batch, :width])
        return forward_loss(model, inputs, labels[batch, :width])

    run = train(model, loss_of, answers, total_steps, steps_per_epoch, batch_size=args.batch_size, lr=args.lr, rng=rng,
                max_minutes=args.max_minutes, say=say, started=started)

    test_pixels, test_row_of = pixel_table(test_paths, processor.image_processor)
    subset = np.arange(len(test_q)) if args.eval_limit is None else rng.permutation(len(test_q))[: args.eval_limit]
    accuracy = greedy_accuracy(model, tokenizer, test_pixels, np.array([test_row_of[test_ids[i]] for i in subset]),
                               [test_q[i] for i in subset], [test_a[i] for i in subset])
    say(f"greedy exact-match accuracy, PyTorch, {len(subset)} test questions: {accuracy:.4f}")

    model.set_attn_implementation("eager")
    model.generation_config.do_sample = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    command = "python scripts/train_easyvqa_mllama.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    training = training_record(command, args, run, len(subset), accuracy, visual_tokens_per_image=int(
        TILES * ((TILE_SIZE // 4) ** 2 + 1)), cross_attention_layers=list(spec().cross_attention_layers))
    write_record(args.out, training)
    write_card(args.out, training)
    say(f"saved {args.out}")
    return 0


def stopped_note(training: dict) -> str:
    if training["steps"] >= training["planned_steps"]:
        return ""
    return (f" The run was stopped by `--max-minutes {training['max_minutes']:g}` at step {training['steps']} of "
            f"{training['planned_steps']} (the schedule's learning rate had decayed to "
            f"{50 * (1 + math.cos(math.pi * training['steps'] / training['planned_steps'])):.0f}% of its peak); on a "
            "faster or quieter machine the same command runs more steps, so its weights differ from these.")


def write_card(folder: Path, training: dict) -> None:
    (folder / "README.md").write_text(f"""# mllama-easyvqa — the Mllama (LLaMA-3.2-Vision-style) default of vtprune

A small `MllamaForConditionalGeneration` trained from scratch on easy-VQA so that Trimmed Llama can be shown on
real data: vision encoder 2 local layers + 1 global layer, width 64, on **4 tiles of 32×32 px with 4 px patches**
(64 patches + CLS per tile → **{training['visual_tokens_per_image']} visual tokens per image**, the cross-attention
states); text decoder 7 layers of width 128 (4 heads, 2 KV heads) whose layers
{', '.join(map(str, training['cross_attention_layers']))} are cross-attention layers. Weights: random init with
non-zero cross-attention and tile-embedding gates (`export.tiny.fix_mllama_init`), all parts trained jointly.

- Training command: `{training['command']}`
- Data: {training['data']}. easy-VQA: MIT licence, © Victor Zhou (github.com/vzhou842/easy-VQA).
- Objective: generative language-model loss on the runtime's own prompt, `<|image|><|begin_of_text|>Question: {{q}}
  Answer:` then ` {{a}}<|eot_id|>` (loss on the answer and EOS); word-level tokenizer with Llama-3's special tokens,
  built from the training split. Curriculum over answer kinds as for the BLIP-2 default
  (`export/easyvqa_training.py`).
- Seed {training['seed']}, {training['steps']} steps of batch {training['batch_size']}, AdamW lr {training['lr']} (warm-up + cosine
  over {training['planned_steps']} steps), {training['threads']} CPU threads, {training['train_minutes']} minutes; final training loss
  {training['final_loss']}.{stopped_note(training)}
- Accuracy (greedy, exact match, PyTorch, unpruned) on {training['test_questions']} easy-VQA test questions:
  **{100 * training['test_accuracy_torch_greedy']:.2f}%**. Accuracy through the ONNX Runtime pipeline against the
  trimming ratio: the project README (`scripts/results/`).
""")


if __name__ == "__main__":
    sys.exit(main())
