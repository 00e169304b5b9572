"""Mammogram classification: model cards, preprocessing, ONNX Runtime sessions, saliency, overlays."""
