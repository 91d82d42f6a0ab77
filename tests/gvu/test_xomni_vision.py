"""The X-Omni pixel path (gvu/models/xomni/vision.py, decoder.py) against tests/fixtures/xomni_vision_tiny, recorded
with the released vision code (scripts/make_xomni_vision_fixture.py): any-resolution preprocessing, the SigLIP ViT,
the VQ codes and features, the SigLIP FLUX transformer and the whole decoder sampling loop."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from test_xomni_backend import one_thread  # noqa: E402, F401  (autouse: one torch thread)

from gvu.models.xomni.decoder import SigLIPFluxTransformer, XOmniDecoder  # noqa: E402
from gvu.models.xomni.vision import SigLIPVQ  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xomni_vision_tiny"
META = json.loads((FIXTURE / "meta.json").read_text())
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def rec():
    return load_file(str(FIXTURE / "recorded.safetensors"))


@pytest.fixture(scope="module")
def vq():
    vc = {
        "transform": META["transform"],
        "encoder": {"gvu_vit": META["vit"], "siglip_name": "siglip2_giant_patch16_384", "siglip_path": "vit.pt",
                    "projector_path": "projector.pt", "z_channels": META["z_channels"],
                    "codebook_size": META["codebook_size"], "codebook_dim": META["codebook_dim"]},
    }  # fmt: skip
    return SigLIPVQ.from_folder(str(FIXTURE), vc)


@pytest.mark.parametrize("name", ["square", "wide", "small"])
def test_tokenizer_matches_released(vq, rec, name):
    img = rec[f"{name}_image"].numpy()
    x = vq.preprocess(img)
    torch.testing.assert_close(x, rec[f"{name}_pre"], rtol=0, atol=1e-6)  # the same PIL resize, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(vq.vit(x[None])[0], rec[f"{name}_feats"], **TOL)
    codes, hw = vq.encode(img[None])
    want = rec[f"{name}_codes"]
    assert hw == tuple(want.shape) and torch.equal(codes[0], want.flatten())


def test_codebook_features_match_released(vq, rec):
    got = vq.features(rec["codes"].flatten()[None], (4, 4))  # (1, 16, Z)
    torch.testing.assert_close(got[0].T.reshape(-1, 4, 4), rec["codes_features"], **TOL)


def test_siglip_flux_transformer_matches_released(rec):
    t = SigLIPFluxTransformer.from_pretrained(FIXTURE / "decoder").eval()
    kw = {k[2:]: v for k, v in rec.items() if k.startswith("t_") and k != "t_out"}
    with torch.no_grad():
        out = t(**kw, return_dict=False)[0]
    torch.testing.assert_close(out, rec["t_out"], **TOL)
    with torch.no_grad():  # the features do enter: zeroing them changes the output
        assert not torch.allclose(t(**{**kw, "siglip_tensor": 0 * kw["siglip_tensor"]}, return_dict=False)[0], out)


@pytest.mark.parametrize("key,texts", [("decoded_prompt", [META["prompt"]]), ("decoded_empty", None)])
def test_decoder_sampling_matches_released_pipeline(vq, rec, key, texts):
    from diffusers import FluxPipeline

    t = SigLIPFluxTransformer.from_pretrained(FIXTURE / "decoder")
    pipe = FluxPipeline.from_pretrained(FIXTURE / "flux", transformer=t)
    pipe.set_progress_bar_config(disable=True)
    d = META["decode"]
    dec = XOmniDecoder(pipe, upscale_factor=16, num_inference_steps=d["steps"], cfg_scale=d["true_cfg"])
    feats = vq.features(rec["codes"].flatten()[None], (4, 4))
    img = dec.decode(feats, (4, 4), texts, [torch.Generator().manual_seed(d["seed"])], max_text_len=d["max_text_len"])
    want = rec[key].numpy()
    assert img.shape == (1, *want.shape) and img.dtype == np.uint8
    assert np.abs(img[0].astype(int) - want).max() <= 1  # uint8 rounding of fp32 values equal to ~1e-6
