"""ControlNet pieces without Ray: Canny edge maps of known shapes, the preprocessor registry, the
zero-convolution identity at initialisation, control-image conversions and config errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffray.methods import validate_config
from diffray.trainers.controlnet import ControlNetTrainConfig
from diffray.data.conditioning import PREPROCESSORS, make_preprocessor
from diffray.data.transforms import BLACK, preprocess_images
from diffray.errors import ConfigError
from diffray.models.loading import load_components
from diffray.trainers.controlnet.task import ControlledUNet, build_controlnet

# Canny (thresholds 100/200) of a white rectangle [8..23] x [10..21] on black, rows 6-25, columns 4-27:
# a one-pixel outline (outside on the left/top, inside on the right/bottom, corners cut).
RECTANGLE_EDGES = """\
........................
........................
........................
.....##############.....
....#..............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
...#...............#....
....################....
........................
........................
........................
........................"""


def edges_of(img: Image.Image, **options) -> np.ndarray:
    out = np.asarray(make_preprocessor("canny", **options)(img))
    assert out.shape == (img.height, img.width, 3) and set(np.unique(out)) <= {0, 255}
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 0] == out[:, :, 2]).all()
    return out[:, :, 0] > 0


def test_canny_edges_of_a_rectangle_match_the_known_map():
    img = Image.new("RGB", (32, 32))
    ImageDraw.Draw(img).rectangle([8, 10, 23, 21], fill=(255, 255, 255))
    e = edges_of(img)
    assert "\n".join("".join(".#"[int(v)] for v in row[4:28]) for row in e[6:26]) == RECTANGLE_EDGES
    assert e.sum() == RECTANGLE_EDGES.count("#")  # nothing outside the window
    np.testing.assert_array_equal(edges_of(img), e)  # deterministic


def test_canny_edges_of_a_disc_lie_on_its_circle_all_the_way_round():
    img = Image.new("RGB", (48, 48))
    ImageDraw.Draw(img).ellipse([8, 8, 39, 39], fill=(255, 255, 255))  # radius 16 around (23.5, 23.5)
    ys, xs = np.nonzero(edges_of(img))
    r = np.hypot(ys - 23.5, xs - 23.5)
    assert r.min() > 15.0 and r.max() < 17.0
    angles = np.degrees(np.arctan2(ys - 23.5, xs - 23.5)) // 10
    assert len(np.unique(angles)) == 36  # every 10-degree sector has edge pixels
    assert not edges_of(Image.new("RGB", (32, 32), (120, 120, 120))).any()  # flat: no edges
    # Thresholds matter: a weak step (gray 80 vs 50) is an edge at 10/20, not at 100/200.
    weak = Image.new("RGB", (32, 32), (50, 50, 50))
    ImageDraw.Draw(weak).rectangle([8, 8, 23, 23], fill=(80, 80, 80))
    assert not edges_of(weak).any() and edges_of(weak, low_threshold=10, high_threshold=20).any()


def test_preprocessor_registry_errors_name_the_problem(tmp_path):
    assert {"canny", "depth"} <= set(PREPROCESSORS)
    with pytest.raises(ConfigError, match=r"unknown conditioning type 'pose' \(allowed: canny, depth"):
        make_preprocessor("pose")
    with pytest.raises(ConfigError, match="canny: .*unexpected keyword argument 'sigma'"):
        make_preprocessor("canny", sigma=2)
    with pytest.raises(ConfigError, match=r"low_threshold \(300\) <= high_threshold \(200\)"):
        make_preprocessor("canny", low_threshold=300, high_threshold=200)
    with pytest.raises(ConfigError, match="depth model not found: .*nothing is downloaded"):
        make_preprocessor("depth", model_path=str(tmp_path / "none"))


def test_controlnet_at_init_leaves_the_unet_output_unchanged(tiny_model_path):
    comps = load_components(tiny_model_path)
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    hidden = torch.randn(2, 77, comps.text_encoder.config.hidden_size, generator=g)
    controls = [torch.rand(2, 3, 64, 64, generator=g), torch.zeros(2, 3, 64, 64)]
    torch.manual_seed(0)  # the control-image encoder's (non-zero) layers are drawn from the global RNG
    model = ControlledUNet(build_controlnet(ControlNetTrainConfig(), comps.unet), comps.unet).eval()
    with torch.no_grad():
        plain = comps.unet(latents, t, encoder_hidden_states=hidden).sample
        for cond in controls:  # zero convolutions: no residual, whatever the control image
            assert torch.equal(model(latents, t, hidden, cond), plain)
        # Once the zero convolutions (control-image embedding output, residual projections) move, the
        # output depends on the control image.
        cn = model.controlnet
        for m in (cn.controlnet_cond_embedding.conv_out, cn.controlnet_down_blocks, cn.controlnet_mid_block):
            for p in m.parameters():
                assert not p.any()
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        a, b = (model(latents, t, hidden, cond) for cond in controls)
    # Exactly equal before; now the control image changes the output (no float noise: same inputs,
    # same result).
    assert (a - b).abs().max() > 1e-4 and (a - plain).abs().max() > 1e-2


def test_training_forward_gets_each_rows_own_control_image_and_dropout_blanks_only_dropped_rows(tiny_model_path):
    from diffray.trainers.controlnet.task import ControlNetTask
    from diffray.trainers.session import WorkerEnv

    env = WorkerEnv(0, 1, torch.device("cpu"), "fp32")
    cond = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) + 0.01  # no blank row
    batch = {"sample_id": torch.arange(6), "conditioning_pixel_values": cond}
    kept = ControlNetTask(validate_config({"method": "controlnet"}), tiny_model_path, env)
    assert kept.cfg.controlnet.conditioning_dropout == 0
    for dropout in (True, False):  # training and held-out losses: the rows' own control images, in order
        assert torch.equal(kept.forward_inputs(batch, 3, dropout)["controlnet_cond"], cond)
    half = ControlNetTask(validate_config({"method": "controlnet", "controlnet": {"conditioning_dropout": 0.5}}),
                          tiny_model_path, env)
    got = half.forward_inputs(batch, 3, True)["controlnet_cond"]
    blank = [not r.any() for r in got]
    assert 0 < sum(blank) < 6, blank  # keyed per sample: some rows dropped, not all
    assert all(torch.equal(got[i], cond[i]) for i in range(6) if not blank[i])
    assert torch.equal(half.forward_inputs(batch, 3, False)["controlnet_cond"], cond)  # no dropout held out


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_grayscale_and_alpha_control_images_become_rgb_on_black():
    gray = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(gray).line([0, 16, 31, 16], fill=255)
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # transparent white: no signal
    ImageDraw.Draw(rgba).line([0, 16, 31, 16], fill=(255, 255, 255, 255))
    out = preprocess_images([png(gray), png(rgba)], [0, 1], ["gray", "rgba"], 32, True, False, 0, background=BLACK)
    for x in out:  # 3 equal channels, the line at +1, the rest (black or transparent) at -1
        assert x.shape == (3, 32, 32) and (x[0] == x[1]).all() and (x[0] == x[2]).all()
        assert x[0, 16].min() > 0.9 and x[0, :8].max() < -0.99
    np.testing.assert_array_equal(out[0], out[1])


def test_controlnet_config_needs_a_conditioning_column():
    cfg = validate_config({"method": "controlnet"})
    assert cfg.data.conditioning_column == "conditioning_image" and cfg.data.path == "builtin:sample/canny"
    with pytest.raises(ConfigError, match=r"data\.conditioning_column: ControlNet trains on .* pairs"):
        validate_config({"method": "controlnet", "data": {"conditioning_column": None}})
    with pytest.raises(ConfigError, match=r"controlnet\.conditioning_dropout"):
        validate_config({"method": "controlnet", "controlnet": {"conditioning_dropout": 2}})


def test_depth_preprocessor_runs_a_local_model(tmp_path):
    # A tiny DPT built from config and saved locally stands in for a real depth model (no download).
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path / "dpt")
    img = Image.new("RGB", (48, 40))
    ImageDraw.Draw(img).ellipse([8, 8, 30, 30], fill=(255, 255, 255))
    depth = make_preprocessor("depth", model_path=str(tmp_path / "dpt"))
    out = np.asarray(depth(img))
    assert out.shape == (40, 48, 3) and out.min() == 0 and out.max() == 255  # normalised to the full range
    assert (out[:, :, 0] == out[:, :, 1]).all()
    np.testing.assert_array_equal(out, np.asarray(depth(img)))


def test_generate_control_arguments_are_checked_before_loading(tmp_path):
    from diffray.errors import ModelError
    from diffray.generate import check_controls, generate_grid
    from diffray.models.loading import load_controlnet

    assert check_controls(["a", "b"], ["x.png", "y.png"], [0.5]) == [0.5, 0.5]
    assert check_controls(["a"], ["x.png"], []) == [1.0]
    for cns, imgs, scales, msg in [([], ["x.png"], [], "--control-image needs --controlnet"),
                                   (["a", "b"], ["x.png"], [], "2 --controlnet but 1 --control-image"),
                                   (["a", "b"], ["x.png", "y.png"], [1, 2, 3], "3 --control-scale for 2")]:
        with pytest.raises(ConfigError, match=msg):
            generate_grid(["p"], None, str(tmp_path / "no-model"), tmp_path / "o.png", controlnets=cns,
                          control_images=imgs, control_scales=scales)
    with pytest.raises(ModelError, match="not a ControlNet dir"):
        load_controlnet(str(tmp_path))


def test_data_condition_refuses_a_file_or_a_used_folder_as_dst_before_any_work(tmp_path):
    """DST a file, or a folder holding an interrupted run's pairs or other files: one line naming DST, nothing in
    it touched, and no Ray job started (the checks come before the source is read)."""
    from diffray.data.conditioning import condition_dataset
    from diffray.errors import DatasetError, StorageError

    (tmp_path / "afile").write_text("keep")
    with pytest.raises(StorageError, match="afile: exists and is a file; give a new or empty folder"):
        condition_dataset(str(tmp_path / "missing-src"), tmp_path / "afile", "canny")
    assert (tmp_path / "afile").read_text() == "keep"
    (tmp_path / "half" / "images").mkdir(parents=True)
    (tmp_path / "half" / "images" / "00000000.png").write_bytes(b"png")
    with pytest.raises(DatasetError, match=r"half: holds the unfinished output of an interrupted run \(no metadata"):
        condition_dataset(str(tmp_path / "missing-src"), tmp_path / "half", "canny")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="mine: output folder exists and is not empty"):
        condition_dataset(str(tmp_path / "missing-src"), tmp_path / "mine", "canny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_depth_without_a_model_folder_and_an_empty_cache_setting_are_one_line_naming_them(tmp_path, monkeypatch,
                                                                                             capsys):
    """`data condition --type depth` without --model-path said `depth() missing 1 required positional argument`;
    `data.cache=` (empty) was taken as the current folder and a latent cache was built there."""
    from testkit.cli import diffray

    code, text = diffray(["data", "condition", tmp_path, tmp_path / "out", "--type", "depth"], monkeypatch, capsys)
    assert code == 2 and text == ("diffray: error: model_path: depth needs a transformers depth-estimation model in a "
                                  "local folder (--model-path; nothing is downloaded)\n"), text
    with pytest.raises(ConfigError, match="data.cache"):
        validate_config({"method": "lora", "model": {"path": "builtin:tiny"}, "data": {"path": "x", "cache": ""}})
