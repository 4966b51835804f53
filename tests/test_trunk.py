"""The image trunk and its preprocessing: ResNet-101 against a reference written with functional calls, weight files
loaded strictly and safely, and torchvision's Resize/CenterCrop rounding worked by hand."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.data.pictures import random_weights
from dedn.errors import DednInputError
from dedn.trunk import (
    MAX_PIXELS,
    MEAN,
    STD,
    ImageError,
    ResNetTrunk,
    build_trunk,
    default_weights_path,
    load_trunk_weights,
    open_image,
    prepare_image,
    resized_size,
)
from tests.images import reference_trunk


def test_the_trunk_equals_a_functional_reference_and_loads_torchvision_names_strictly(tmp_path: Path) -> None:
    state = random_weights(1)
    torch.save(state, tmp_path / "w.pth")
    loaded = load_trunk_weights(tmp_path / "w.pth")
    assert set(loaded) == set(ResNetTrunk().state_dict()) and not any(k.startswith("fc.") for k in loaded)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = build_trunk(loaded)(x)
        want = reference_trunk(state, x)
    assert got.shape == (2, 2048, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_safetensors_weights_load_the_same(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = random_weights(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    loaded = load_trunk_weights(tmp_path / "w.safetensors")
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k


def test_weights_of_another_architecture_are_one_line(tmp_path: Path) -> None:
    torch.save(ResNetTrunk(layers=(3, 4, 6, 3)).state_dict(), tmp_path / "resnet50.pth")  # ResNet-50's layout
    with pytest.raises(DednInputError) as e:
        load_trunk_weights(tmp_path / "resnet50.pth")
    msg = str(e.value)
    # layer3 has 6 blocks, not 23: 17 blocks of 3 convolutions and 3 batch norms (weight, bias, mean, var, count)
    assert "resnet50.pth: weights: not a torchvision ResNet-101 state_dict: 306 missing, 0 unexpected" in msg, msg
    assert "\n" not in msg


def test_absent_weights_say_where_to_put_them_and_nothing_is_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    where = default_weights_path()
    assert where == tmp_path / "torch" / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    with pytest.raises(DednInputError) as e:
        load_trunk_weights(where)
    assert f"{where}: weights: not found; put torchvision's ResNet-101 ImageNet weights" in str(e.value)
    assert "nothing is downloaded" in str(e.value)
    assert not (tmp_path / "torch").exists()


class _RunsCode:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.target,))

    def __init__(self, target: str) -> None:
        self.target = target


def test_a_weights_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as f:
        pickle.dump({"conv1.weight": _RunsCode(str(tmp_path / "ran"))}, f)
    with pytest.raises(DednInputError) as e:
        load_trunk_weights(evil)
    assert "evil.pth: weights: not a readable state_dict" in str(e.value)
    assert not (tmp_path / "ran").exists()


def test_resize_follows_torchvision_truncation() -> None:
    assert resized_size(600, 400, 448) == (672, 448)
    assert resized_size(333, 500, 224) == (224, 336)  # 224 * 500 / 333 = 336.34, truncated
    assert resized_size(300, 300, 64) == (64, 64)
    assert resized_size(401, 300, 64) == (85, 64)  # 85.55 truncated, not rounded


@pytest.mark.parametrize("width, first_column", [(85, 10), (87, 12), (64, 0)])
def test_centre_crop_rounds_half_to_even_as_torchvision(width: int, first_column: int) -> None:
    """An image already at the size on its shorter side is not resized; the crop's first column is
    round((W - 64) / 2) with Python's rounding: 10.5 -> 10, 11.5 -> 12."""
    from PIL import Image

    cols = np.tile(np.arange(width, dtype=np.uint8)[None, :, None], (64, 1, 3))
    x = prepare_image(Image.fromarray(cols, "RGB"), 64)
    recovered = np.rint((x[0] * STD[0] + MEAN[0]) * 255.0)  # the red channel back in 0..255
    np.testing.assert_array_equal(recovered[0], np.arange(first_column, first_column + 64))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "RGB"])
def test_every_mode_becomes_rgb_then_normalised_with_imagenet_statistics(mode: str) -> None:
    from PIL import Image

    rgb = Image.new("RGB", (50, 70), (200, 100, 30))
    img = rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.Palette.ADAPTIVE)  # exact colour
    want_rgb = np.asarray(img.convert("RGB"))[0, 0].astype(np.float32)  # what PIL's conversion gives
    x = prepare_image(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(x[c], (want_rgb[c] / 255.0 - MEAN[c]) / STD[c], rtol=1e-6, atol=1e-6)


def test_the_trunk_equals_torchvision_where_it_imports() -> None:
    try:
        import torchvision
    except Exception as e:  # the CPU build of torch here has no matching torchvision
        pytest.skip(f"torchvision does not import here: {type(e).__name__}")
    ref = torchvision.models.resnet101().eval()
    state = ref.state_dict()
    trunk = build_trunk({k: v for k, v in state.items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = torch.nn.Sequential(*list(ref.children())[:-2])(x)
        torch.testing.assert_close(trunk(x), want)


def _encoded(img: object, fmt: str, **kw: object) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)  # type: ignore[attr-defined]
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_open_image_decodes_the_taken_formats_as_pillow_does(fmt: str, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8), "RGB")
    data = _encoded(img if fmt != "GIF" else img.convert("P"), fmt)
    with open_image(data) as got, Image.open(__import__("io").BytesIO(data)) as want:
        assert got.size == (31, 23) and np.array_equal(np.asarray(got), np.asarray(want))
    (tmp_path / "pic").write_bytes(data)
    with open_image(tmp_path / "pic") as from_file:
        assert from_file.format == fmt


def test_open_image_refuses_what_it_does_not_take_each_with_its_rule() -> None:
    from PIL import Image

    noise = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    jpeg = _encoded(Image.fromarray(noise, "RGB"), "JPEG")  # its header a small part of it
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow would run Ghostscript for it
    cases = {
        b"plain text, not a picture": "not a picture in a supported format (JPEG, PNG, WEBP, BMP, GIF, TIFF)",
        eps: "not a picture in a supported format",
        jpeg[: len(jpeg) // 2]: "cannot be decoded: OSError",
        _encoded(Image.new("L", (10_000, 10_000)), "PNG"): "10000x10000 pixels is over the limit of 64 megapixels",
        _encoded(Image.new("L", (15_000, 15_000)), "PNG"): "more than twice 89 megapixels",
        _encoded(Image.new("I;16", (8, 8)), "PNG"): "mode 'I;16' is not supported",
        _encoded(Image.new("F", (8, 8)), "TIFF"): "mode 'F' is not supported",
    }
    for data, rule in cases.items():
        with pytest.raises(ImageError) as e:
            open_image(data)
        assert rule in str(e.value) and "\n" not in str(e.value), (rule, str(e.value))
    assert MAX_PIXELS == 64_000_000
