"""The X-Omni pixel path (gvu/models/xomni/vision.py, decoder.py) against tests/fixtures/xomni_vision_tiny, recorded
with the released vision code (scripts/make_xomni_vision_fixture.py): any-resolution preprocessing, the SigLIP ViT,
the VQ codes and features, the SigLIP FLUX transformer and the whole decoder sampling loop; then the backend on
reward_path pixels (decode, re-encode, reward, a trainer step)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from test_xomni_backend import PROMPTS, one_thread, run_files  # noqa: E402, F401  (one_thread: autouse)

from gvu.config import load_config  # noqa: E402
from gvu.models import load_umm  # noqa: E402
from gvu.models.xomni.backend import XOmniUMM  # noqa: E402
from gvu.models.xomni.codes import read_codes  # noqa: E402
from gvu.models.xomni.decoder import SigLIPFluxTransformer, XOmniDecoder  # noqa: E402
from gvu.models.xomni.options import folder_problems  # noqa: E402
from gvu.models.xomni.vision import SigLIPVQ  # noqa: E402
from gvu.rollout import SamplingConfig  # noqa: E402
from gvu.testing import make_tiny_xomni  # noqa: E402

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


# ----------------------------------------------------------------------------------------------- pixel path (a)


@pytest.fixture(scope="module")
def tiny_pixels(tmp_path_factory):
    """The tiny X-Omni with random SigLIP-VQ and FLUX decoder parts, loaded with reward_path pixels."""
    from gvu.models.xomni.tiny import write_tiny_vision

    root = tmp_path_factory.mktemp("xomni_pixels")
    path = make_tiny_xomni(str(root / "ckpt"))
    write_tiny_vision(path, str(root / "flux"))
    (Path(path) / "gvu_xomni.json").write_text(
        json.dumps({"image_size": 64, "reward_path": "pixels", "flux_path": str(root / "flux")})
    )
    cfg = load_config(None, ["--model.backend=xomni", f"--model.path={path}"])
    assert XOmniUMM.check_config(cfg.model) == []
    backend, model = load_umm(cfg.model)
    return path, backend, model


def test_pixel_path_decodes_reencodes_and_scores_batch_independently(tiny_pixels):
    from gvu.rewards import intrinsic_reward

    _, backend, model = tiny_pixels
    assert backend.reward_path == "pixels" and type(backend.codec).__name__ == "PixelCodec"
    prompts = backend.tokenize_prompts(PROMPTS[1:])
    codes = backend.generate(model, prompts, 1, SamplingConfig(min_p=0.03), generator=torch.Generator().manual_seed(0))
    images = backend.decode(codes)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 1
    alone = np.concatenate([backend.decode(codes[i : i + 1]) for i in range(2)])
    assert np.abs(alone.astype(int) - images).max() <= 1  # each row's noise is its own: batch-independent
    back, hw = backend.codec.encode(images)  # the SigLIP-VQ tokenizer on the decoded pixels
    assert hw == backend.hw and back.shape == codes.shape and int(back.max()) < backend.num_codes
    conditioned = backend.decode(codes, texts=PROMPTS[1:])  # the released mmdecode's text condition
    assert np.abs(conditioned.astype(int) - images).mean() > 0.5  # reaches the pixels: the leak decode closes
    with torch.no_grad():
        r = intrinsic_reward(backend, model, images, prompts)
        r1 = torch.cat([intrinsic_reward(backend, model, images[i : i + 1], prompts[[i]]) for i in range(2)])
        u = backend.understanding_inputs(images, prompts)
    torch.testing.assert_close(r1, r, rtol=1e-5, atol=0)
    P = backend.understanding_prefix(back).shape[1]
    assert torch.equal(u.input_ids[:, :P], backend.understanding_prefix(back))  # the re-encoded codes are read


def test_pixel_path_refused_without_diffusers(tiny_pixels, monkeypatch):
    import importlib.util

    path, _, _ = tiny_pixels
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert any("needs diffusers" in p for p in folder_problems(path))


def test_one_training_step_on_the_pixel_path(tiny_pixels, tmp_path):
    """The trainer's step with reward_path pixels: rollout, FLUX decode, SigLIP-VQ re-encode, reward, update."""
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    path, _, _ = tiny_pixels
    cfg, over = run_files(tmp_path, path, 2)
    cfg = load_config(cfg, over + [f"--train.output_dir={tmp_path / 'run'}"])
    rank, world = E.init_distributed()
    backend, model = E.build(cfg)
    assert backend.reward_path == "pixels"
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    m, images = train.train_step(engine, backend, sampler.batch(0), cfg, 0, rank, PhaseTimer())
    assert np.isfinite(m["loss"]) and 0 < m["reward/mean"] < 1 and images.shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="not decode's code rendering"):  # decoded pixels are no code rendering
        read_codes(images, backend.hw, backend.num_codes)
