"""Where bf16 costs mask agreement: LiteMedSAM's encoder stages and the decoder's up-scaling.

Two studies on the calibration slices and box prompts of ``SlicerSAM.backends`` (the bundled
CT), each against torch fp32 masks, on CPUs with bf16 (AMX / AVX-512 BF16):

1. the image encoder with bf16 autocast in some of its stages only (TinyViT: the patch
   embedding, stages 0-3, the neck), ms per slice and Dice of the box masks;
2. the mask decoder with its two up-scaling matrix products in bf16 (the rest fp32), ms per
   prompt on one thread and Dice of box and click masks.

    python Testing/benchmarks/bench_precision.py [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ENCODER_SPLITS = [
    (),
    ("patch", "stage0", "stage1", "stage2", "stage3", "neck"),
    ("patch", "stage0"),
    ("patch", "stage0", "stage1"),
    ("stage1", "stage2", "stage3"),
    ("stage2", "stage3"),
    ("stage3", "neck"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="encoder threads")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    import sam_core.mask_decoder as md
    from sam_core.predictor import SamPredictor
    from sam_core.runtimes import cpu_text
    from sam_core.tiny_vit import _channels_last_view
    from sam_core.zoo import load_model
    from SlicerSAM import backends

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_text()}")
    sam = load_model("litemedsam", device="cpu")
    encoder = sam.image_encoder
    case = backends.calibration_case()
    predictor = SamPredictor(sam)

    def masks_of(embeddings, clicks=False):
        out = []
        for embedding, (_, boxes) in zip(embeddings, case):
            predictor.set_embedding(embedding)
            for box in boxes:
                out.append(predictor.predict(box=box, multimask_output=False)[0][0])
                if clicks:
                    centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
                    out.append(
                        predictor.predict(centre, np.array([1]), multimask_output=False)[0][0]
                    )
        return out

    reference = [predictor.encode(image) for image, _ in case]
    reference_masks = masks_of(reference)

    def split_encoder(stages):
        def autocast(name):
            if name in stages:
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def forward(x):  # TinyViT.forward_fast with autocast per stage
            with torch.inference_mode():
                x = x.permute(0, 2, 3, 1)
                with autocast("patch"):
                    x = encoder.patch_embed.forward_nhwc(x)
                for i, layer in enumerate(encoder.layers):
                    with autocast(f"stage{i}"):
                        x = layer.forward_nhwc(x.float())
                b, r = x.shape[0], encoder.out_resolution
                x = x.float().reshape(b, r, r, x.shape[-1])
                conv1, norm1, conv2, norm2 = encoder.neck
                with autocast("neck"):
                    x = F.linear(x, conv1.weight.reshape(conv1.out_channels, -1), conv1.bias)
                    x = F.layer_norm(x, (x.shape[-1],), norm1.weight, norm1.bias, norm1.eps)
                    x = conv2(_channels_last_view(x)).permute(0, 2, 3, 1)
                    x = F.layer_norm(x, (x.shape[-1],), norm2.weight, norm2.bias, norm2.eps)
                return x.float().permute(0, 3, 1, 2).contiguous()

        return forward

    print(
        f"\n1. encoder stages in bf16 ({args.threads} threads; {len(reference_masks)} box prompts)"
    )
    print(f"{'bf16 stages':46s} {'ms/slice':>9s}  Dice mean / min vs fp32")
    for stages in ENCODER_SPLITS:
        predictor.encoder = split_encoder(set(stages))
        times, embeddings = [], []
        for image, _ in case:
            predictor.encode(image)  # warm-up
            start = time.perf_counter()
            embeddings.append(predictor.encode(image))
            times.append((time.perf_counter() - start) * 1000)
        predictor.encoder = None
        dice = [backends._dice(a, b) for a, b in zip(masks_of(embeddings), reference_masks)]
        label = ", ".join(stages) or "none (fp32)"
        print(f"{label:46s} {statistics.median(times):9.1f}  {np.mean(dice):.4f} / {min(dice):.4f}")

    plain = md.MaskDecoder._upscale_tokens

    def upscale_bf16(self, keys, hyper_in, size):
        up1, norm, act1, up2, act2 = self.output_upscaling
        b, n, c = keys.shape
        h, w = size
        w1, b1, w2, b2 = self._upscale_weights()
        x = torch.mm(keys.reshape(b * n, c).bfloat16(), w1.bfloat16()).float().add_(b1)
        c1 = up1.out_channels
        x = md._activation_(act1, F.layer_norm(x.reshape(-1, c1), (c1,), norm.weight, norm.bias))
        x = torch.mm(x.bfloat16(), w2.bfloat16()).float().add_(b2)
        x = md._activation_(act2, x).reshape(b, n * 16, up2.out_channels)
        m = hyper_in.shape[1]
        masks = torch.bmm(x, hyper_in.transpose(1, 2))
        masks = masks.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * h, 4 * w)

    torch.set_num_threads(1)
    results = {}
    for name, upscale in (("fp32", plain), ("bf16 up-scaling", upscale_bf16)):
        md.MaskDecoder._upscale_tokens = upscale
        try:
            masks_of(reference[:1])  # warm-up
            start = time.perf_counter()
            out = masks_of(reference, clicks=True)
            results[name] = (out, (time.perf_counter() - start) * 1000 / len(out))
        finally:
            md.MaskDecoder._upscale_tokens = plain
    dice = [backends._dice(a, b) for a, b in zip(results["bf16 up-scaling"][0], results["fp32"][0])]
    print(f"\n2. decoder on one thread ({len(dice)} box and click prompts), ms/prompt:")
    print(f"   fp32 {results['fp32'][1]:.1f}, bf16 up-scaling {results['bf16 up-scaling'][1]:.1f}")
    print(f"   masks of bf16 up-scaling vs fp32: Dice mean {np.mean(dice):.4f} min {min(dice):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
