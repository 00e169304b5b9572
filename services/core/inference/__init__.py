"""Mammogram classification: model cards, preprocessing, ONNX Runtime, saliency, overlays."""
