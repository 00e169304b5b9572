"""Per-breast inference latency on CPU: ONNX Runtime against torch eager, same model, same inputs.

    .venv/bin/python bench/bench_inference.py [--arch cnn3] [--repeats 30]

The model is the shipped CNN3 architecture at the shipped input size, exported in this run, so
both runtimes execute the same weights. Rows: probability only, and probability + Grad-CAM
(torch needs a backward pass for it; the ONNX graph computes it with forward operations).
Target: ONNX Runtime at least 1.5x faster than torch eager.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.architectures import build
from models.gradcam import autograd_gradcam
from services.core.inference.card import load_card
from services.lab.training.train import export_onnx

CARD = Path(__file__).resolve().parents[1] / "models" / "cnn3-phantom-v2.json"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn3")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    shape = tuple(load_card(CARD).input_shape[2:]) if CARD.exists() else (246, 250)
    torch.manual_seed(0)
    model = build(args.arch, (int(shape[0]), int(shape[1]))).eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, (int(shape[0]), int(shape[1])), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(
            f"# {args.arch}, input 1x{shape[0]}x{shape[1]}, {threads} threads, median of "
            f"{args.repeats}; torch {torch.__version__}, onnxruntime {ort.__version__}"
        )
        print(
            f"{'what':<24} {'batch':>5} {'torch ms':>9} {'ORT ms':>8} {'speed-up':>8} "
            f"{'ms/breast ORT':>13}"
        )
        for batch in (1, 8):
            x = np.random.default_rng(batch).random((batch, 1, *shape), dtype=np.float32)
            xt = torch.from_numpy(x)

            def torch_prob(xt: torch.Tensor = xt) -> None:
                with torch.no_grad():
                    torch.sigmoid(model(xt))

            def torch_cam(xt: torch.Tensor = xt) -> None:
                autograd_gradcam(model, xt)

            def ort_prob(x: np.ndarray = x) -> None:
                session.run(["malignancy"], {"image": x})

            def ort_cam(x: np.ndarray = x) -> None:
                session.run(None, {"image": x})

            for name, t_fn, o_fn in (
                ("probability", torch_prob, ort_prob),
                ("probability + Grad-CAM", torch_cam, ort_cam),
            ):
                t_ms = median_ms(t_fn, args.repeats)
                o_ms = median_ms(o_fn, args.repeats)
                print(
                    f"{name:<24} {batch:>5} {t_ms:9.2f} {o_ms:8.2f} {t_ms / o_ms:8.2f} "
                    f"{o_ms / batch:13.2f}"
                )


if __name__ == "__main__":
    main()
