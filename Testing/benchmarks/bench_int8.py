"""Int8 attempt: static, calibrated quantisation of LiteMedSAM's image encoder, judged by masks.

The encoder's ONNX graph (``sam_core.onnx_export``) is quantised with onnxruntime's static
quantiser: QDQ format, int8 weights per output channel, uint8 activations calibrated on slices of
the bundled sample CT (min-max or percentile). The quantised graph runs on onnxruntime and on
OpenVINO (which executes QDQ graphs with int8 kernels: VNNI / AMX-INT8 where the CPU has them).
Each variant's box masks are compared with torch fp32's on the calibration prompts of
``SlicerSAM.backends`` (held out: the quantiser calibrates on other slices), and timed
interleaved with the fp32 runtimes. The rule for adopting a precision is the engine's
(``backends.AGREEMENT_MEAN`` / ``AGREEMENT_MIN``).

    python Testing/benchmarks/bench_int8.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime
    import openvino
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from sam_core.onnx_export import export_encoder
    from sam_core.predictor import SamPredictor
    from sam_core.runtimes import cpu_text
    from sam_core.zoo import load_model
    from SlicerSAM import backends
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.segmenter import Segmenter
    from SlicerSAM.volume import load_volume

    torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_text()}; {args.threads} threads; onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.__version__}"
    )
    sam = load_model("litemedsam", device="cpu")
    case = backends.calibration_case()  # held-out evaluation slices and their boxes
    # calibration inputs for the quantiser: every 3rd slice of the sample CT that is not above
    volume = load_volume(backends.SAMPLE / "ct.nii.gz")
    segmenter = Segmenter(
        volume, sam, intensity=parse_intensity("40,400"), backend="torch", precision="fp32"
    )
    evaluation = [image for image, _ in case]
    calib = []
    for k in range(1, segmenter.num_slices, 3):
        image = segmenter.model_image(k)
        if not any(np.array_equal(image, other) for other in evaluation):
            calib.append(backends._preprocessed(sam, image))
    print(
        f"quantiser calibration: {len(calib)} slices; evaluation: {len(case)} other slices, "
        f"{sum(len(b) for _, b in case)} box prompts"
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"image": x} for x in calib)

        def get_next(self):
            return next(self.items, None)

    work = Path(tempfile.mkdtemp(prefix="slicersam-int8-"))
    fp32_path = export_encoder(sam, work / "encoder.onnx")
    variants = {}
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
        path = work / f"encoder-int8-{method.name.lower()}.onnx"
        quantize_static(
            str(fp32_path),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            calibrate_method=method,
        )
        variants[method.name.lower()] = path

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    core = openvino.Core()

    def ort(path):
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    def ov(path, hint="f32"):
        compiled = core.compile_model(
            str(path),
            "CPU",
            {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": hint},
        )
        return lambda x: torch.from_numpy(compiled(x.numpy())[0].copy())

    runtimes = {
        "torch-fp32": None,
        "openvino-fp32": ov(fp32_path),
        "onnxruntime-fp32": ort(fp32_path),
    }
    for name, path in variants.items():
        runtimes[f"onnxruntime-int8-{name}"] = ort(path)
        runtimes[f"openvino-int8-{name}"] = ov(path)
    predictor = SamPredictor(sam)
    times = {name: [] for name in runtimes}
    masks = {}
    for rep in range(args.repeats + 1):
        names = list(runtimes)
        names = names[rep % len(names) :] + names[: rep % len(names)]
        for name in names:
            predictor.encoder = runtimes[name]
            for image, boxes in case:
                start = time.perf_counter()
                embedding = predictor.encode(image)
                if rep:
                    times[name].append((time.perf_counter() - start) * 1000)
                else:
                    predictor.set_embedding(embedding)
                    masks.setdefault(name, []).extend(
                        predictor.predict(box=b, multimask_output=False)[0][0] for b in boxes
                    )
    base = statistics.median(times["torch-fp32"])
    print(f"\n{'runtime':28s} {'ms/slice':>9s} {'vs torch':>9s}  masks vs torch fp32")
    for name in runtimes:
        dice = [backends._dice(a, b) for a, b in zip(masks[name], masks["torch-fp32"])]
        mean, low = float(np.mean(dice)), float(np.min(dice))
        ok = mean >= backends.AGREEMENT_MEAN and low >= backends.AGREEMENT_MIN
        ms = statistics.median(times[name])
        print(
            f"{name:28s} {ms:9.1f} {base / ms:8.2f}x  Dice mean {mean:.4f} min {low:.4f}"
            f"  {'agrees' if ok else 'does not agree'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
