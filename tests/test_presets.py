"""Real-width presets (export/presets.py): the registry holds the real checkpoints' values, the depth rules keep
HF's invariants, and a preset is written and loads with from_pretrained."""
from __future__ import annotations

import json

import pytest

from export import presets
from export.presets import PRESETS, mllama_depth_rules
from runtime.errors import UnsupportedError, UsageError

BLIP2, MLLAMA = PRESETS["blip2-opt-2.7b"], PRESETS["llama-3.2-11b-vision"]


def full_config(preset):
    """The HF config object of ``preset`` at its real depths (with the stand-in tokenizer's ids)."""
    import transformers

    tokenizer = preset.family.tokenizer()
    preset.family.processor(tokenizer, preset.config)
    kwargs = preset.config_kwargs(preset.full_depths(), tokenizer)
    return getattr(transformers, preset.family.config_class)(**kwargs), tokenizer


def test_blip2_registry_is_the_real_checkpoint():
    config, tokenizer = full_config(BLIP2)
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    assert BLIP2.mimics == "Salesforce/blip2-opt-2.7b"
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, vision.num_hidden_layers) == (1408, 6144, 16, 39)
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps) == (224, 14, 1e-6)
    assert (qformer.hidden_size, qformer.num_attention_heads, qformer.num_hidden_layers, qformer.intermediate_size) == (768, 12, 12, 3072)
    assert (qformer.cross_attention_frequency, qformer.encoder_hidden_size, qformer.vocab_size) == (2, 1408, 30522)
    assert config.num_query_tokens == 32
    assert (text.model_type, text.hidden_size, text.ffn_dim, text.num_hidden_layers, text.num_attention_heads) == ("opt", 2560, 10240, 32, 32)
    assert (text.vocab_size, text.max_position_embeddings, text.word_embed_proj_dim) == (50272, 2048, 2560)
    assert text.tie_word_embeddings and text.do_layer_norm_before
    assert BLIP2.visual_tokens() == (224 // 14) ** 2 + 1 == 257
    ids = [config.image_token_index, text.bos_token_id, text.eos_token_id, text.pad_token_id]
    assert all(0 <= i < text.vocab_size for i in ids) and len(tokenizer) <= text.vocab_size
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")


def test_mllama_registry_is_the_real_checkpoint():
    config, tokenizer = full_config(MLLAMA)
    vision, text = config.vision_config, config.text_config
    assert MLLAMA.mimics == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_global_layers) == (1280, 5120, 32, 8)
    assert (vision.attention_heads, vision.image_size, vision.patch_size, vision.max_num_tiles) == (16, 560, 14, 4)
    assert vision.vision_output_dim == 7680 == 1280 * (1 + len(vision.intermediate_layers_indices))
    assert vision.intermediate_layers_indices == [3, 7, 15, 23, 30]
    from transformers import MllamaConfig

    assert vision.supported_aspect_ratios == MllamaConfig().vision_config.supported_aspect_ratios  # HF's, 4 tiles
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 14336, 40, 32)
    assert (text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == (8, 128256, 131072)
    assert text.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    assert text.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not text.tie_word_embeddings and text.rms_norm_eps == 1e-5
    assert MLLAMA.visual_tokens() == ((560 // 14) ** 2 + 1) * 4 == 6404
    ids = [config.image_token_index, text.bos_token_id, text.eos_token_id, text.pad_token_id]
    assert all(0 <= i < text.vocab_size for i in ids) and len(tokenizer) <= text.vocab_size
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<|image|>")


def test_mllama_processor_is_the_real_one():
    processor = MLLAMA.family.processor(MLLAMA.family.tokenizer(), MLLAMA.config)
    images = processor.image_processor
    assert (images.size["height"], images.size["width"], images.max_image_tiles, images.resample) == (560, 560, 4, 2)
    assert list(images.image_mean) == [0.48145466, 0.4578275, 0.40821073] and processor.chat_template


def mllama_reduced(vision: int, text: int) -> dict:
    return mllama_depth_rules(MLLAMA.config_kwargs({"vision_layers": vision, "global_layers": 1, "text_layers": text},
                                                   MLLAMA.family.tokenizer()))


@pytest.mark.parametrize("text, cross", [(40, [3, 8, 13, 18, 23, 28, 33, 38]), (10, [3, 8]), (9, [3, 8]), (8, [3]), (4, [3])])
def test_mllama_cross_layers_are_the_real_ones_below_the_depth(text, cross):
    assert mllama_reduced(2, text)["text_config"]["cross_attention_layers"] == cross


def test_mllama_without_a_cross_layer_is_refused():
    with pytest.raises(UsageError, match="no cross-attention layer"):
        mllama_reduced(2, 3)


@pytest.mark.parametrize("vision, indices", [(32, [3, 7, 15, 23, 30]), (16, [3, 7, 15, 15, 15]), (2, [1, 1, 1, 1, 1]), (1, [0] * 5)])
def test_mllama_intermediate_indices_stay_valid(vision, indices):
    """HF stacks ``hidden_states[i]`` (one per local layer) for each index: all must be < the depth, and five of them
    keep the projector's real input width."""
    config = mllama_reduced(vision, 10)["vision_config"]
    assert config["intermediate_layers_indices"] == indices and all(i < vision for i in indices)
    assert config["vision_output_dim"] == 7680


def test_depth_flags():
    assert BLIP2.depths_for({}) == {"vision_layers": 2, "qformer_layers": 2, "text_layers": 2}
    assert MLLAMA.depths_for({"text_layers": 12, "qformer_layers": None}) == {"vision_layers": 2, "global_layers": 1, "text_layers": 12}
    assert MLLAMA.depths_for({}, full_depth=True) == {"vision_layers": 32, "global_layers": 8, "text_layers": 40}
    with pytest.raises(UsageError, match="--qformer-layers does not apply"):
        MLLAMA.depths_for({"qformer_layers": 2})
    with pytest.raises(UsageError, match="between 1 and 39"):
        BLIP2.depths_for({"vision_layers": 40})
    with pytest.raises(UsageError, match="exclude each other"):
        BLIP2.depths_for({"text_layers": 2}, full_depth=True)


def test_full_depth_that_does_not_fit_is_refused(monkeypatch, tmp_path, capsys):
    """The 11B preset in fp32 (42.7 GB) on a machine with 24 GB: one line, exit 2, nothing written or built."""
    with pytest.raises(UnsupportedError, match="fewer layers or --dtype fp16"):
        presets.check_memory(MLLAMA, 10_670_220_835, "fp32", 24 << 30)
    monkeypatch.setattr(presets, "available_memory", lambda: 24 << 30)
    monkeypatch.setattr(presets, "build_model", lambda *a: pytest.fail("built despite the memory check"))
    with pytest.raises(SystemExit) as exit_info:
        presets.main(["llama-3.2-11b-vision", "--full-depth", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "42.7 GB" in err
    assert not (tmp_path / "m").exists()


def test_smallest_blip2_preset_is_written_and_loads(tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    out = tmp_path / "blip2-d1"
    info = presets.make_preset("blip2-opt-2.7b", out, {"vision_layers": 1, "qformer_layers": 1, "text_layers": 1},
                               dtype="fp16", say=lambda line: None)
    model = Blip2ForConditionalGeneration.from_pretrained(out, dtype="auto")  # as written (HF keeps the Q-Former fp32)
    config = model.config
    assert model.language_model.lm_head.weight.dtype.itemsize == model.vision_model.post_layernorm.weight.dtype.itemsize == 2
    assert (config.vision_config.hidden_size, config.qformer_config.hidden_size, config.text_config.hidden_size) == (1408, 768, 2560)
    assert model.language_model.get_input_embeddings().weight.shape == (50272, 2560)
    assert model.language_model.lm_head.weight.shape == (50272, 2560)
    assert model.vision_model.embeddings.position_embedding.shape[1] == 257
    assert tuple(model.query_tokens.shape) == (1, 32, 768) and model.query_tokens.float().std() > 0.5  # init fixed
    assert [config.vision_config.num_hidden_layers, config.qformer_config.num_hidden_layers, config.text_config.num_hidden_layers] == [1, 1, 1]
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index < 50272
    assert processor.image_processor.size == {"height": 224, "width": 224} and processor.num_query_tokens == 32
    written = json.loads((out / "preset.json").read_text())
    assert written["parameters"] == info["parameters"] == sum(p.numel() for p in model.parameters())
    assert written["full_depths"] == {"vision_layers": 39, "qformer_layers": 12, "text_layers": 32}
    assert written["dtype"] == "fp16" and "random" in written["note"] and written["bytes"] > 2 * info["parameters"]
    with pytest.raises(UsageError, match="not empty"):
        presets.make_preset("blip2-opt-2.7b", out, say=lambda line: None)
