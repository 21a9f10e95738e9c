"""Transformers' Gemma 4 processors as the reference: what they make of a row's media."""

from __future__ import annotations

from PIL import Image

from mlxtune.data import media


def image_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


def feature_extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


def hf_inputs(folder, row: dict, budget: int = 70) -> dict:
    """What transformers' own processors make of a row's media (its reference inputs)."""
    parts = [p for m in row["messages"] if isinstance(m["content"], list) for p in m["content"]]
    images = [Image.open(folder / p["image"]).convert("RGB") for p in parts if p["type"] == "image"]
    clips = [media.read_audio(folder / p["audio"], "", media.AudioSpec())
             for p in parts if p["type"] == "audio"]  # fmt: skip
    out = {}
    if images:
        pix = image_processor()(images=images, max_soft_tokens=budget, return_tensors="pt")
        out |= {
            "pixel_values": pix["pixel_values"],
            "image_position_ids": pix["image_position_ids"],
        }
    if clips:
        mel = feature_extractor()(clips, return_tensors="pt")
        out |= {"input_features": mel["input_features"],
                "input_features_mask": mel["input_features_mask"]}  # fmt: skip
    return out
