"""Encoder runtimes (sam_core/runtimes.py, SlicerSAM/backends.py) and the ONNX export.

Real LiteMedSAM on real CT slices (the bundled sample and ../shared's CT): the exported graphs
against PyTorch, every installed backend's masks against torch fp32, ``auto``'s choice and its
cache, and the refusals (a backend that is not installed, a precision the hardware lacks, an
ONNX file of another model). OpenVINO and onnxruntime are in the test extra; where one is not
installed its tests skip, saying so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_core.runtimes import Runtime, RuntimeUnavailable, cpu_description, installed
from SlicerSAM import backends
from SlicerSAM.cache import CacheKey
from SlicerSAM.cli import main

REAL_CANDIDATES = backends.candidates
needs_ort = pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime not installed")
needs_ov = pytest.mark.skipif(not installed("openvino"), reason="openvino not installed")


@pytest.fixture(scope="module")
def sam(litemedsam_checkpoint):
    from sam_core.zoo import load_model

    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def identity(sam):
    from SlicerSAM.segmenter import _model_identity

    return _model_identity(sam)


@pytest.fixture(scope="module")
def exported(sam, identity, tmp_path_factory):
    pytest.importorskip("onnx")
    from sam_core.onnx_export import export_model, model_metadata

    folder = tmp_path_factory.mktemp("onnx")
    export_model(sam, folder, model_metadata(sam, *identity))
    return folder


# ------------------------------------------------------------------------------ export
@needs_ort
def test_export_round_trip_reproduces_pytorch_on_ct_slices(sam, identity, exported):
    from sam_core.onnx_export import read_metadata

    assert read_metadata(exported / "encoder.onnx")["model"] == "litemedsam"
    assert read_metadata(exported / "decoder.onnx")["checkpoint_sha256"] == identity[1]
    check = backends.check_export(sam, exported)
    assert check["prompts"] >= 20
    assert check["embedding_max_abs"] < 1e-3
    assert check["box_dice_min"] >= 0.99 and check["click_dice_min"] >= 0.99
    # exporting leaves the model as it was: eval mode, fast paths on
    assert not sam.training and not sam.image_encoder.training


@needs_ort
def test_exported_decoder_takes_any_number_of_points_and_a_mask(sam, exported):
    import onnxruntime

    from sam_core.predictor import SamPredictor
    from sam_core.transforms import apply_coords

    image, boxes = backends.calibration_case()[0]
    predictor = SamPredictor(sam)
    embedding = predictor.encode(image)
    predictor.set_embedding(embedding)
    box = boxes[0]
    clicks = np.array([[box[0] + 2, box[1] + 2], [(box[0] + box[2]) / 2, box[3] - 1]], np.float32)
    clicks = np.concatenate([clicks, [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]])
    labels = np.array([0, 1, 1])
    want, _, low_res = predictor.predict(clicks, labels, multimask_output=False)
    again = predictor.predict(clicks, labels, mask_input=low_res, multimask_output=False)[0]
    decoder = onnxruntime.InferenceSession(str(exported / "decoder.onnx"))
    coords = apply_coords(clicks, embedding.original_size, embedding.input_size)
    feeds = {
        "image_embeddings": embedding.features.numpy(),
        "point_coords": np.concatenate([coords, [[0, 0]]])[None].astype(np.float32),
        "point_labels": np.array([[0, 1, 1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(embedding.original_size, np.float32),
    }
    masks, iou, low = decoder.run(None, feeds)
    assert masks.shape == (1, 4) + tuple(embedding.original_size) and iou.shape == (1, 4)
    assert backends._dice(masks[0, 0] > 0, want[0]) >= 0.99
    feeds.update(mask_input=low_res[None].astype(np.float32), has_mask_input=np.ones(1, np.float32))
    assert backends._dice(decoder.run(None, feeds)[0][0, 0] > 0, again[0]) >= 0.99


@needs_ort
def test_export_onnx_command_writes_a_checked_folder_and_refuses_an_existing_one(tmp_path, capsys):
    out = tmp_path / "litemedsam-onnx"
    assert main(["export-onnx", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
    assert json.loads((out / "model.json").read_text())["model"] == "litemedsam"
    assert "box masks Dice mean 1.0000" in capsys.readouterr().out
    assert main(["export-onnx", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


# ------------------------------------------------------------------------------ backends
def _calibration_row(sam, identity, runtime, folder):
    def build(r):
        return backends.build_encoder(sam, r, identity, onnx_dir=folder, threads=2)

    return backends.calibrate(sam, [runtime], build)


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param("onnxruntime-fp32", marks=needs_ort),
        pytest.param("openvino-fp32", marks=needs_ov),
    ],
)
def test_each_fp32_backend_gives_pytorchs_masks_on_ct_slices(sam, identity, exported, runtime):
    row = _calibration_row(sam, identity, Runtime.parse(runtime), exported)
    assert row["torch-fp32"]["dice_min"] == 1.0  # the reference against itself
    assert row[runtime]["prompts"] >= 20
    assert row[runtime]["dice_min"] >= 0.99 and row[runtime]["agrees"]
    assert row[runtime]["ms_per_slice"] > 0


@pytest.mark.slow
def test_reduced_precisions_are_judged_by_their_masks(sam, identity, exported):
    """Every reduced precision this CPU has, on every installed backend: the calibration
    reports its agreement with fp32 and ``agrees`` is exactly the documented rule."""
    options = [
        r for r in backends.candidates("auto", "auto", torch.device("cpu")) if r.precision != "fp32"
    ]
    if not options:
        pytest.skip(f"this CPU has no reduced precision ({cpu_description()['flags']})")
    build = lambda r: backends.build_encoder(sam, r, identity, exported, threads=2)  # noqa: E731
    rows = backends.calibrate(sam, options, build)
    for runtime in options:
        row = rows[runtime.name]
        rule = row["dice_mean"] >= backends.AGREEMENT_MEAN and row["dice_min"] >= 0.95
        assert row["agrees"] == rule and 0.5 < row["dice_mean"] <= 1.0, (runtime, row)
    choice = backends.fastest_agreeing(rows)
    assert rows[choice.name]["agrees"]


@pytest.mark.shared_data
@needs_ov
def test_a_segmenter_on_openvino_gives_torchs_key_slice_mask(shared_data, sam, exported):
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.prompts import SlicePrompts
    from SlicerSAM.segmenter import Segmenter
    from SlicerSAM.volume import load_volume

    ct = load_volume(shared_data / "ct-abdomen-3mm" / "ct.nii.gz")
    box = SlicePrompts(12, box_xyxy=np.array([60, 90, 120, 160], np.float32))
    masks = []
    for backend in ("torch", "openvino"):
        segmenter = Segmenter(
            ct,
            sam,
            intensity=parse_intensity("40,400"),
            backend=backend,
            precision="fp32",
            onnx_dir=exported,
        )
        assert segmenter.runtime == Runtime(backend, "fp32")
        assert backend in segmenter.runtime_reason
        masks.append(segmenter.segment(12, box).masks[0])
    assert masks[0].any() and backends._dice(masks[0], masks[1]) >= 0.99


# ------------------------------------------------------------------------------ auto
def _fake_calibration(calls):
    """A calibration that records its calls (the real one is tested above): openvino-fp32 the
    fastest that agrees, torch-bf16 faster but off."""

    def calibrate(sam, runtimes, build, progress=None):
        calls.append(sorted(r.name for r in runtimes))
        rows = {"torch-fp32": (400.0, 1.0, 1.0)}
        rows.update({r.name: (300.0, 1.0, 1.0) for r in runtimes if r.precision == "fp32"})
        rows.update({r.name: (150.0, 0.98, 0.85) for r in runtimes if r.precision != "fp32"})
        rows["torch-fp32"] = (400.0, 1.0, 1.0)
        return {
            k: {"ms_per_slice": t, "dice_mean": m, "dice_min": n, "agrees": m >= 0.99 and n >= 0.95}
            for k, (t, m, n) in rows.items()
        }

    return calibrate


@pytest.fixture
def fake_calibration(monkeypatch):
    """Calibrations recorded instead of run, over three candidates; returns the record."""
    calls = []
    monkeypatch.setattr(backends, "calibrate", _fake_calibration(calls))
    monkeypatch.setattr(backends, "build_encoder", lambda *a, **k: None)
    monkeypatch.setattr(
        backends,
        "candidates",
        lambda b, p, d: [Runtime(), Runtime("openvino"), Runtime("torch", "bf16")],
    )
    return calls


def test_auto_is_cached_per_model_and_machine_and_says_what_it_picked(
    sam, identity, tmp_path, monkeypatch, fake_calibration
):
    calls = fake_calibration

    def choose(ident=identity):
        sam.__dict__.pop("_slicersam_runtime_choices", None)  # a new process: nothing in memory
        return backends.choose_runtime(sam, ident, "auto", "auto", home=tmp_path)

    first = choose()
    assert first.runtime == Runtime("openvino", "fp32") and "calibrated now" in first.reason
    assert "openvino-fp32" in first.reason and "agree" in first.reason
    second = choose()
    assert second.runtime == first.runtime and "cached in" in second.reason and len(calls) == 1
    choose((identity[0], "0" * 64))  # other weights: calibrates again
    assert len(calls) == 2
    other_cpu = dict(cpu_description(), model="Another CPU", flags=["avx2"])
    monkeypatch.setattr(backends, "cpu_description", lambda: other_cpu)
    choose()  # another machine: again
    assert len(calls) == 3
    choose()
    assert len(calls) == 3
    stored = json.loads((tmp_path / backends.CHOICE_FILE).read_text())
    assert len(stored) == 3


def test_one_candidate_needs_no_calibration(sam, identity, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    sam.__dict__.pop("_slicersam_runtime_choices", None)
    choice = backends.choose_runtime(sam, identity, "torch", "fp32", home=tmp_path)
    assert choice.runtime == Runtime() and choice.encoder is None and "asked for" in choice.reason
    assert not (tmp_path / backends.CHOICE_FILE).exists()


# ------------------------------------------------------------------------------ refusals
def test_a_backend_that_is_not_installed_is_refused_naming_the_extra(monkeypatch):
    import sam_core.runtimes as runtimes

    monkeypatch.setattr(runtimes, "installed", lambda name: name == "torch")
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'slicersam\[openvino\]'"):
        backends.candidates("openvino", "auto", torch.device("cpu"))
    # auto only considers what is installed
    assert {r.backend for r in backends.candidates("auto", "auto", torch.device("cpu"))} == {
        "torch"
    }


def test_cli_refuses_a_missing_backend_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import sam_core.runtimes as runtimes
    import sam_core.zoo as zoo

    monkeypatch.setattr(runtimes, "installed", lambda name: name == "torch")
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    ct = backends.SAMPLE / "ct.nii.gz"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"frame": "kji", "points": [{"position": [15, 50, 60]}]}))
    argv = ["segment", str(ct), "--prompts", str(prompts), "--output", str(tmp_path / "o.nii.gz")]
    assert main(argv + ["--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install" in err and "Traceback" not in err
    assert main(argv + ["--backend", "torch", "--onnx", str(tmp_path / "nowhere")]) == 2
    assert "no encoder.onnx there" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize(
    "backend, precision, message",
    [
        ("tensorrt", "fp32", "unknown backend"),
        ("torch", "int4", "unknown precision"),
    ],
)
def test_unknown_names_are_refused(backend, precision, message):
    with pytest.raises(RuntimeUnavailable, match=message):
        backends.requested(backend, precision)


def test_a_precision_the_cpu_lacks_is_refused(monkeypatch):
    import sam_core.runtimes as runtimes

    plain = {"model": "AVX2-only CPU", "flags": ["avx2", "fma"], "cpus": 2}
    monkeypatch.setattr(runtimes, "cpu_description", lambda: plain)
    assert runtimes.hardware_precisions("torch", "cpu") == ("fp32",)
    with pytest.raises(RuntimeUnavailable, match="no fast bf16"):
        backends.candidates("torch", "bf16", torch.device("cpu"))
    amx = {"model": "AMX CPU", "flags": ["avx512f", "avx512_bf16", "amx_bf16"], "cpus": 2}
    monkeypatch.setattr(runtimes, "cpu_description", lambda: amx)
    assert runtimes.hardware_precisions("torch", "cpu") == ("fp32", "bf16")
    assert runtimes.hardware_precisions("onnxruntime", "cpu") == ("fp32",)


@needs_ort
def test_an_onnx_folder_of_another_model_is_refused(sam, identity, exported, tmp_path):
    with pytest.raises(RuntimeUnavailable, match="exported from model 'litemedsam'"):
        backends.check_onnx_model(exported / "encoder.onnx", "medsam", identity[1])
    with pytest.raises(RuntimeUnavailable, match="not 'litemedsam'"):
        backends.onnx_encoder_path(sam, ("litemedsam", "f" * 64), onnx_dir=exported)
    with pytest.raises(RuntimeUnavailable, match="does not exist"):
        backends.onnx_encoder_path(sam, identity, onnx_dir=tmp_path)
    (tmp_path / "encoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(RuntimeUnavailable, match="not a readable ONNX file"):
        backends.onnx_encoder_path(sam, identity, onnx_dir=tmp_path)


def test_embeddings_of_a_reduced_precision_have_their_own_cache_key():
    fields = dict(
        volume_digest="v",
        orientation="axial",
        axis=0,
        index=3,
        intensity="w",
        model="m",
        checkpoint_sha256="s",
    )
    fp32 = CacheKey(**fields)
    # the fp32 digest is the one keys had before precisions existed (caches on disk stay valid)
    import hashlib

    from SlicerSAM.cache import DISK_FORMAT

    text = json.dumps({"format": DISK_FORMAT, **fields}, sort_keys=True)
    assert fp32.digest() == hashlib.sha256(text.encode()).hexdigest()
    assert CacheKey(**fields, precision="bf16").digest() != fp32.digest()


def test_runtimes_command_shows_the_calibration_and_recalibrates_on_request(
    sam, tmp_path, monkeypatch, capsys, fake_calibration
):
    calls = fake_calibration
    monkeypatch.setenv("SLICERSAM_CACHE", str(tmp_path / "models"))
    argv = ["runtimes", "--backend", "auto", "--precision", "auto"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out and "flags:" in out
    assert "torch-bf16" in out and "differs" in out and "openvino-fp32" in out
    assert "encoder runtime openvino-fp32" in out and len(calls) == 1
    assert (tmp_path / backends.CHOICE_FILE).is_file()
    assert main(argv) == 0 and len(calls) == 1  # cached
    assert main(argv + ["--recalibrate"]) == 0 and len(calls) == 2
    monkeypatch.setattr(backends, "candidates", REAL_CANDIDATES)
    assert main(["runtimes", "--backend", "torch", "--precision", "fp32"]) == 0
    assert "torch-fp32 (asked for)" in capsys.readouterr().out


def test_a_tie_with_torch_fp32_keeps_torch_fp32():
    def row(ms, agrees=True):
        return {"ms_per_slice": ms, "dice_mean": 1.0, "dice_min": 1.0, "agrees": agrees}

    tie = {"torch-fp32": row(441.9), "openvino-fp32": row(439.2), "torch-bf16": row(200, False)}
    assert backends.fastest_agreeing(tie) == Runtime()
    faster = dict(tie, **{"openvino-fp32": row(400.0)})
    assert backends.fastest_agreeing(faster) == Runtime("openvino", "fp32")
    assert backends.fastest_agreeing(dict(faster, **{"torch-bf16": row(200)})) == Runtime(
        "torch", "bf16"
    )
