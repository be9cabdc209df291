"""OpenVINO paths for goal 1 of issue 5, measured against the baseline's fp32 encode in the same run.

Not part of `make bench`: OpenVINO and NNCF are not dependencies of the project. Install them into a
scratch folder. They resolve beside sentence-transformers 6.x without touching torch or transformers;
``--no-deps`` with the packages the venv lacks keeps a second numpy/scipy out of the scratch folder:

    .venv/bin/pip install --no-deps --target /tmp/ovlib openvino openvino-telemetry nncf ninja psutil pydot pyparsing
    PYTHONPATH=/tmp/ovlib .venv/bin/python -m benchmarks.openvino_int8

Paths: baseline ``encode(64)`` fp32, ours (torch bfloat16), OpenVINO bf16 (the converted torch model),
and OpenVINO static int8 from NNCF post-training quantization (calibrated on chunks that are not
measured) with three settings. Each path is scored by chunks/s ratio to the baseline, mean cosine to
the fp32 vectors and recall@10 of self-retrieval among the measured chunks against fp32 exact search.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import numpy as np

from benchmarks import baseline
from benchmarks.run import DEFAULT_CORPUS, exact_ids, interleaved_rounds, recall


def sample_chunks(corpus: Path, pages: int, seed: int = 0) -> list[str]:
    files = baseline.html_files(corpus)
    random.Random(seed).shuffle(files)
    chunks = [c for path in files[:pages] for c in baseline.word_windows(baseline.page_text(path))]
    random.Random(seed + 1).shuffle(chunks)
    return chunks


def openvino_encoder(compiled, tokenizer, max_length: int, token_budget: int = 16384):
    """Length-sorted token-budget batches through a compiled OpenVINO model; mean pooling + L2 norm
    (the pooling all-MiniLM-L6-v2 declares in its modules.json)."""
    names = [i.get_any_name() for i in compiled.inputs]

    def encode(texts: list[str]) -> np.ndarray:
        lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), compiled.outputs[0].get_partial_shape()[-1].get_length()), np.float32)
        i = 0
        while i < len(order):
            take = order[i : i + max(1, token_budget // int(lengths[order[i]]))]
            i += len(take)
            feats = tokenizer([texts[j] for j in take], padding=True, truncation=True, max_length=max_length, return_tensors="np")
            hidden = compiled({k: feats[k] for k in names})[0]
            mask = feats["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[take] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    return encode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import nncf
    import openvino as ov
    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    from resources.model import EmbeddingModelResource

    chunks = sample_chunks(args.corpus, pages=40)
    calibration, chunks = chunks[: args.calibration], chunks[args.calibration : args.calibration + args.chunks]
    st = baseline.load_model()
    tokenizer, max_length = st.tokenizer, st.max_seq_length
    example = {k: torch.from_numpy(v) for k, v in tokenizer(chunks[:4], padding=True, truncation=True, return_tensors="np").items()}
    model = ov.convert_model(st[0].auto_model.eval(), example_input=example)
    model.reshape({i.get_any_name(): ov.PartialShape([-1, -1]) for i in model.inputs})
    core = ov.Core()
    names = [i.get_any_name() for i in model.inputs]
    calib_items = []
    for text in calibration:
        feats = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        calib_items.append({k: feats[k] for k in names})
    ours = EmbeddingModelResource(dtype="bfloat16")
    paths = {
        "baseline encode(64) fp32": lambda texts: baseline.encode(st, texts),
        "ours torch bfloat16": lambda texts: ours.encode(texts)[0],
        "openvino bf16": openvino_encoder(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}), tokenizer, max_length),
    }
    variants = {
        "openvino int8 (nncf, performance preset)": {},
        "openvino int8 (nncf, mixed preset)": {"preset": nncf.QuantizationPreset.MIXED},
        "openvino int8 (nncf, mixed, no smooth quant)": {
            "preset": nncf.QuantizationPreset.MIXED,
            "advanced_parameters": AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        },
    }
    for name, kwargs in variants.items():
        quantized = nncf.quantize(model, nncf.Dataset(calib_items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib_items), **kwargs)
        paths[name] = openvino_encoder(core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}), tokenizer, max_length)

    speeds, vectors = interleaved_rounds(paths, chunks, args.rounds)
    reference = vectors["baseline encode(64) fp32"]
    truth = exact_ids(reference, reference)
    base = statistics.median(speeds["baseline encode(64) fp32"])
    print(f"{len(chunks)} chunks, {len(calibration)} calibration chunks, median of {args.rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}, openvino {ov.__version__}, nncf {nncf.__version__}\n")
    print("| path | chunks/s | ratio vs baseline | mean cos vs fp32 | min cos | recall@10 vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name in paths:
        v = vectors[name] / np.linalg.norm(vectors[name], axis=1, keepdims=True)
        cos = (v * reference).sum(1)
        speed = statistics.median(speeds[name])
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {cos.mean():.5f} | {cos.min():.5f} | {recall(exact_ids(v, v), truth):.3f} |")


if __name__ == "__main__":
    main()
