"""Data: the shapes dataset, the shapes checker, image folders, collate and build_dataset."""

import json
import math
import re
import warnings
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion import DiffusionConfig
from diffusion.data import build_dataset, collate
from diffusion.folder import ImageFolderDataset
from diffusion.images import unit_float_image
from diffusion.shapes import (
    SHAPE_COLOURS,
    SHAPES,
    ShapesDataset,
    all_captions,
    draw_shape,
    parse_caption,
)
from sampling.shapes_checker import classify_shape_image, shapes_adherence

N_CAPTIONS = len(SHAPE_COLOURS) * len(SHAPES)
N_CHECK = 600  # images per checker test: 25 per caption
N_NOISE = 240  # noise images per kind: 10 per caption


def chance_tolerance(n):
    """4 binomial standard errors of an accuracy over n images at the largest chance level (1/4):
    0.071 for 600 images, 0.11 for 240. A checker at chance passes with near certainty."""
    return 4 * math.sqrt(0.25 * 0.75 / n)


def shapes_batch(sample_size, seed=0, n=N_CHECK):
    data = ShapesDataset(size=n, sample_size=sample_size, seed=seed)
    items = [data[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["text"] for it in items]


# ---- ShapesDataset ----

def test_shapes_item_shape_range_and_caption():
    item = ShapesDataset(size=30, sample_size=32)[7]
    image = item["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() == -1.0 and image.max() == 1.0  # black background, saturated shape
    assert item["text"] == all_captions()[7]
    colour, _ = parse_caption(item["text"])
    foreground = image.amax(dim=0) > 0  # (H, W)
    expected = torch.tensor(SHAPE_COLOURS[colour]) / 127.5 - 1
    assert torch.equal(image[:, foreground].T, expected.expand(int(foreground.sum()), 3))


def test_shapes_deterministic_per_seed_and_index():
    a, b = ShapesDataset(size=48, seed=3), ShapesDataset(size=48, seed=3)
    backwards = [b[i]["image"] for i in reversed(range(48))][::-1]  # access order is irrelevant
    for i in range(48):
        assert torch.equal(a[i]["image"], backwards[i])
    other = ShapesDataset(size=48, seed=4)
    differ = sum(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(48))
    assert differ >= 45
    assert all(a[i]["text"] == other[i]["text"] for i in range(48))  # captions depend on i only


def test_shapes_leave_global_rng_alone():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    data = ShapesDataset(size=10)
    _ = [data[i] for i in range(10)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_captions_balanced_and_all_captions_covered():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == N_CAPTIONS
    data = ShapesDataset(size=N_CAPTIONS * 5, sample_size=16)
    counts = Counter(data[i]["text"] for i in range(len(data)))
    assert set(counts) == set(captions) and set(counts.values()) == {5}
    assert all(data.caption(i) == data[i]["text"] for i in range(len(data)))
    uneven = Counter(ShapesDataset(size=N_CAPTIONS + 7, sample_size=16)[i]["text"]
                     for i in range(N_CAPTIONS + 7))
    assert max(uneven.values()) - min(uneven.values()) == 1
    assert len(ShapesDataset()) % N_CAPTIONS == 0


@pytest.mark.parametrize("sample_size", [16, 32])
def test_shapes_stay_inside_with_a_margin(sample_size):
    images, _ = shapes_batch(sample_size, n=200)
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0],
                        images[:, :, :, -1]], dim=-1)
    assert torch.all(border == -1.0)
    sides = [int((im.amax(dim=0) > 0).any(dim=0).sum()) for im in images]
    assert min(sides) >= 0.35 * sample_size  # big enough to read


def test_parse_caption_round_trip_and_errors():
    for colour in SHAPE_COLOURS:
        for shape in SHAPES:
            assert parse_caption(f"a {colour} {shape}") == (colour, shape)
    assert parse_caption("  A Red   CIRCLE ") == ("red", "circle")
    for bad in ("a purple circle", "a red hexagon", "red circle", "a big red circle", ""):
        with pytest.raises(ValueError, match="not a shapes caption.*allowed"):
            parse_caption(bad)


def test_shapes_dataset_errors():
    with pytest.raises(ValueError, match="sample_size=8 must be an int >= 16"):
        ShapesDataset(size=4, sample_size=8)
    with pytest.raises(ValueError, match="size=0 must be a positive int"):
        ShapesDataset(size=0)
    with pytest.raises(ValueError, match="seed=-1"):
        ShapesDataset(size=4, seed=-1)
    with pytest.raises(IndexError, match="index=4 is out of range"):
        ShapesDataset(size=4)[4]
    assert torch.equal(ShapesDataset(size=4)[-1]["image"], ShapesDataset(size=4)[3]["image"])


# ---- the checker ----

@pytest.mark.parametrize("sample_size", [16, 32])
def test_checker_reads_ground_truth(sample_size):
    images, prompts = shapes_batch(sample_size, seed=11)
    result = shapes_adherence(images, prompts)
    assert result["n"] == N_CHECK
    assert result["colour"] == 1.0
    assert result["shape"] >= 0.98 and result["both"] >= 0.98
    assert result["both_correct"] == round(result["both"] * N_CHECK)
    confusion = result["shape_confusion"]  # rows: prompted shape; columns: the shape read
    assert sum(sum(row.values()) for row in confusion.values()) == N_CHECK
    assert sum(confusion[s][s] for s in confusion) == result["shape_correct"]


def test_checker_confusion_names_the_shape_it_read():
    """A square drawn for every prompt: each prompted shape's row puts all its images under
    'square'; a black image is read as nothing ('none')."""
    images, prompts = shapes_batch(32, seed=14)
    squares = [i for i, p in enumerate(prompts) if p.endswith("square")]
    drawn = images[squares[:4]]
    colours_of = [prompts[i].split()[1] for i in squares[:4]]
    captions = [f"a {c} {s}" for c, s in zip(colours_of, SHAPES)]
    result = shapes_adherence(torch.cat([drawn, -torch.ones_like(drawn[:1])]),
                              captions + ["a red circle"])
    confusion = result["shape_confusion"]
    assert [confusion[s]["square"] for s in SHAPES] == [1, 1, 1, 1]
    assert confusion["circle"]["none"] == 1 and result["shape_correct"] == 1


def test_checker_survives_mild_blur_and_noise():
    images, prompts = shapes_batch(32, seed=12, n=240)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (blurred + 0.1 * noise).clamp(-1, 1)
    assert shapes_adherence(noisy, prompts)["both"] >= 0.95


def test_checker_near_chance_with_shuffled_prompts():
    images, prompts = shapes_batch(32, seed=13)
    order = torch.randperm(N_CHECK, generator=torch.Generator().manual_seed(0)).tolist()
    result = shapes_adherence(images, [prompts[i] for i in order])
    for key in ("colour", "shape", "both"):
        assert abs(result[key] - result[f"chance_{key}"]) <= chance_tolerance(N_CHECK), result


def noise_images(kind, n, size=32):
    gen = torch.Generator().manual_seed(1)
    if kind == "uniform":
        return torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, 3, size, size, generator=gen).clamp(-1, 1)
    # sparse: black with 10% random bright pixels
    speckles = torch.rand(n, 1, size, size, generator=gen) < 0.1
    return torch.where(speckles, torch.rand(n, 3, size, size, generator=gen) * 2 - 1, -1.0)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "sparse"])
def test_checker_at_or_below_chance_on_noise(kind):
    prompts = all_captions() * (N_NOISE // N_CAPTIONS)
    result = shapes_adherence(noise_images(kind, N_NOISE), prompts)
    for key in ("colour", "shape", "both"):
        assert result[key] <= result[f"chance_{key}"] + chance_tolerance(N_NOISE), (key, result)


@pytest.mark.parametrize("value", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_checker_reads_nothing_in_flat_images(value):
    image = torch.full((3, 32, 32), value)
    assert classify_shape_image(image) == (None, None)
    result = shapes_adherence(image.expand(N_CAPTIONS, -1, -1, -1), all_captions())
    assert result["both_correct"] == 0 and result["unreadable"] == N_CAPTIONS


def test_checker_refuses_off_palette_colours_and_unknown_shapes():
    canvas = np.zeros((32, 32, 3), dtype=np.uint8)
    for rgb in ((255, 255, 255), (255, 128, 0), (128, 128, 128)):  # white, orange, grey
        square = canvas.copy()
        square[8:24, 8:24] = rgb
        assert classify_shape_image(Image.fromarray(square)) == (None, "square")
    bar = canvas.copy()
    bar[14:18, 4:28] = SHAPE_COLOURS["red"]  # elongated: no shape of the set
    assert classify_shape_image(Image.fromarray(bar)) == ("red", None)
    dot = canvas.copy()
    dot[10:12, 10:12] = SHAPE_COLOURS["red"]  # too small to be a shape
    assert classify_shape_image(Image.fromarray(dot)) == ("red", None)


def test_checker_takes_pil_images_and_tensors_alike():
    images, prompts = shapes_batch(32, n=48)
    as_pil = [Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
              for im in images]
    assert [classify_shape_image(p) for p in as_pil] == [classify_shape_image(t) for t in images]
    assert shapes_adherence(as_pil, prompts)["both"] == 1.0


def test_checker_chance_levels_and_errors():
    images, prompts = shapes_batch(16, n=4)
    result = shapes_adherence(images, prompts)
    assert result["chance_colour"] == pytest.approx(1 / len(SHAPE_COLOURS))
    assert result["chance_shape"] == pytest.approx(1 / len(SHAPES))
    assert result["chance_both"] == pytest.approx(1 / N_CAPTIONS)
    with pytest.raises(ValueError, match="got 4 images but 3 prompts"):
        shapes_adherence(images, prompts[:3])
    with pytest.raises(ValueError, match="'a red blob' is not a shapes caption"):
        shapes_adherence(images, prompts[:3] + ["a red blob"])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\); got shape \(3, 16, 16\)"):
        shapes_adherence(images[0], prompts[:1])
    with pytest.raises(ValueError, match=r"\(3, H, W\) tensor.*got shape \(1, 16, 16\)"):
        classify_shape_image(images[0, :1])
    with pytest.raises(TypeError, match="got ndarray"):
        classify_shape_image(np.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="empty"):
        shapes_adherence([], [])
    with pytest.raises(TypeError, match="prompts must be a list of captions, not one string"):
        shapes_adherence(images[:1], "a red circle")


def test_draw_shape_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"colour='purple' is not one of \['red', 'green'"):
        draw_shape("purple", "circle", 16, rng)
    with pytest.raises(ValueError, match=r"shape='star' is not one of \['circle', 'square'"):
        draw_shape("red", "star", 16, rng)


# ---- ImageFolderDataset ----

def solid(rgb, size=(24, 24)):
    return Image.new("RGB", size, rgb)


def write_folder(root, formats=("png", "jpg", "webp")):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for i, (fmt, rgb) in enumerate(zip(formats, colours)):
        solid(rgb).save(root / f"img{i}.{fmt}")
    return root


def test_folder_reads_png_jpeg_webp(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "notes.md").write_text("not an image")
    with pytest.warns(UserWarning, match="3 of 3 images .* have no caption"):
        data = ImageFolderDataset(tmp_path, sample_size=16)
    assert len(data) == 3 and data.captions == ["", "", ""]
    for i, item in enumerate(data):
        image = item["image"]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
        assert int(image.mean(dim=(1, 2)).argmax()) == i  # the dominant channel survived
    with pytest.warns(UserWarning):
        grey = ImageFolderDataset(tmp_path, sample_size=8, in_channels=1)
    assert grey[0]["image"].shape == (1, 8, 8)


def test_metadata_file_names_are_normalised(tmp_path):
    """"sub/../a.png" passed every check and then matched no image: its caption was dropped
    with a 'no caption' warning."""
    solid((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "sub/../a.png", "text": "red"}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFolderDataset(tmp_path, sample_size=8).captions == ["red"]


def test_folder_captions_metadata_then_txt_then_empty(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        solid((255, 255, 255)).save(tmp_path / name)
    lines = [{"file_name": "a.png", "text": "from metadata", "seed": 3},
             {"file_name": "sub/d.png", "text": "nested"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    (tmp_path / "a.txt").write_text("loses to metadata")
    (tmp_path / "b.txt").write_text("from txt\n")
    with pytest.warns(UserWarning, match="1 of 4 images"):
        data = ImageFolderDataset(tmp_path, sample_size=8)
    assert [data[i]["text"] for i in range(4)] == ["from metadata", "from txt", "", "nested"]


def test_caption_files_drop_a_byte_order_mark_and_must_be_utf8(tmp_path):
    """A BOM (Windows editors) stayed in .txt captions as 3 extra bytes and made
    metadata.jsonl's first line invalid JSON; a latin-1 caption was a UnicodeDecodeError that
    named no file."""
    for name in ("a.png", "b.png"):
        solid((9, 9, 9)).save(tmp_path / name)
    (tmp_path / "a.txt").write_bytes("\ufeffa red cat\r\n".encode())
    (tmp_path / "metadata.jsonl").write_bytes(
        ("\ufeff" + json.dumps({"file_name": "b.png", "text": "a blue dog"}) + "\n").encode())
    data = ImageFolderDataset(tmp_path, sample_size=8)
    assert data.captions == ["a red cat", "a blue dog"]
    (tmp_path / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"caption file '{tmp_path / 'a.txt'}' is not UTF-8 "
                                         rf"text \(unexpected end of data at byte 3\)"):
        ImageFolderDataset(tmp_path, sample_size=8)


def test_folder_without_missing_captions_does_not_warn(tmp_path):
    solid((9, 9, 9)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("dark")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFolderDataset(tmp_path, sample_size=8)[0]["text"] == "dark"


@pytest.mark.parametrize("size", [(64, 16), (16, 64)])
def test_folder_resizes_shorter_side_and_crops_the_centre(tmp_path, size):
    # Halves of different colours along the long side: only a centred crop shows both halves.
    image = Image.new("RGB", size, (255, 0, 0))
    half = (size[0] // 2, 0) if size[0] > size[1] else (0, size[1] // 2)
    image.paste((0, 0, 255), half + size)
    image.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("x")
    pixels = ImageFolderDataset(tmp_path, sample_size=8)[0]["image"]  # (3, 8, 8)
    first, second = (pixels[:, :, :4], pixels[:, :, 4:]) if size[0] > size[1] else \
        (pixels[:, :4], pixels[:, 4:])
    assert pixels.shape == (3, 8, 8)
    assert torch.all(first[0] > 0.5) and torch.all(first[2] < -0.5)  # red half
    assert torch.all(second[2] > 0.5) and torch.all(second[0] < -0.5)  # blue half


@pytest.mark.parametrize("wide", [True, False])
def test_folder_crops_the_long_side_instead_of_squashing(tmp_path, wide):
    """Shorter side already sample_size: no resampling, the item is exactly the centre square."""
    pixels = np.zeros((16, 48, 3), dtype=np.uint8)  # (H, W, 3): green ends, red + blue middle
    pixels[:, :8], pixels[:, 40:] = (0, 255, 0), (0, 255, 0)
    pixels[:, 8:24], pixels[:, 24:40] = (255, 0, 0), (0, 0, 255)
    if not wide:
        pixels = pixels.transpose(1, 0, 2).copy()  # (48, 16, 3): the same bands top to bottom
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    centre = pixels[:, 16:32] if wide else pixels[16:32]
    expected = torch.from_numpy(centre).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(ImageFolderDataset(tmp_path, sample_size=16)[0]["image"], expected)


def test_folder_downscaling_filters_instead_of_picking_pixels(tmp_path):
    """1-px black/white stripes shrunk 4x average to mid-grey (nearest-pixel would alias)."""
    stripes = np.zeros((32, 32), dtype=np.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    image = ImageFolderDataset(tmp_path, sample_size=8)[0]["image"]
    assert image.shape == (3, 8, 8) and image.abs().max() < 0.1


def test_folder_applies_the_exif_orientation(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90 CW) is loaded upright."""
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "a.jpg", exif=exif, quality=95)
    (tmp_path / "a.txt").write_text("x")
    pixels = ImageFolderDataset(tmp_path, sample_size=8)[0]["image"]  # upright: red top
    assert torch.all(pixels[0, :4] > 0.5) and torch.all(pixels[2, :4] < -0.5)
    assert torch.all(pixels[2, 4:] > 0.5) and torch.all(pixels[0, 4:] < -0.5)


def test_folder_finds_upper_case_extensions(tmp_path):
    """Camera files are often named IMG_0001.JPG: extensions match in any case."""
    for name in ("a.PNG", "b.JPG", "c.Jpeg", "d.WebP"):
        solid((10, 20, 30)).save(tmp_path / name)
    with pytest.warns(UserWarning, match="4 of 4 images"):
        assert len(ImageFolderDataset(tmp_path, sample_size=8)) == 4


def test_folder_flips_deterministic_per_seed_epoch_index(tmp_path):
    for i in range(12):
        image = Image.new("RGB", (8, 8), (0, 0, 0))
        image.paste((255, 255, 255), (0, 0, 4, 8))  # white left half
        image.save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text("half")
    torch_state = torch.get_rng_state()
    plain = ImageFolderDataset(tmp_path, sample_size=8)
    flipping = ImageFolderDataset(tmp_path, sample_size=8, random_flip=True, seed=5)
    again = ImageFolderDataset(tmp_path, sample_size=8, random_flip=True, seed=5)
    pattern = {}
    for epoch in range(3):
        flipping.set_epoch(epoch)
        again.set_epoch(epoch)
        flips = []
        for i in range(12):
            got, original = flipping[i]["image"], plain[i]["image"]
            assert torch.equal(got, again[i]["image"])
            flips.append(not torch.equal(got, original))
            assert torch.equal(got, original.flip(-1) if flips[-1] else original)
        pattern[epoch] = flips
    assert pattern[0] != pattern[1] or pattern[1] != pattern[2]
    assert 0 < sum(sum(p) for p in pattern.values()) < 36
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_folder_flip_rate_is_one_half_and_no_flips_without_random_flip(tmp_path):
    """200 (epoch, index) draws flip 100 +- 4 sd (72..128) times; random_flip=False: none."""
    pixels = np.zeros((4, 4), dtype=np.uint8)
    pixels[:, :2] = 255  # white left half: a flip shows
    for i in range(40):
        Image.fromarray(pixels).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text("half")
    upright = torch.from_numpy(pixels).float().div(127.5).sub(1).expand(3, 4, 4)
    flipping = ImageFolderDataset(tmp_path, sample_size=4, random_flip=True, seed=1)
    plain = ImageFolderDataset(tmp_path, sample_size=4, random_flip=False, seed=1)
    flips = 0
    for epoch in range(5):
        flipping.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(40):
            flips += not torch.equal(flipping[i]["image"], upright)
            assert torch.equal(plain[i]["image"], upright)
    assert 72 <= flips <= 128, flips


def test_folder_skipping_the_last_file_wraps_around_to_the_first(tmp_path):
    solid((255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png" * 10)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(name)
    data = ImageFolderDataset(tmp_path, sample_size=8)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*b\.png"):
        item = data[1]
    assert item["text"] == "a" and torch.equal(item["image"], data[0]["image"])


def test_folder_skips_corrupt_files_with_a_warning_and_counts_them(tmp_path):
    solid((255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"this is not a png at all" * 10)
    solid((0, 0, 255)).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match="no caption"):
        data = ImageFolderDataset(tmp_path, sample_size=8)
    assert len(data) == 3 and data.num_skipped == 0
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*b\.png"):
        item = data[1]
    assert data.num_skipped == 1 and data.skipped == [tmp_path / "b.png"]
    assert item["image"][2].mean() > 0.9  # c.png stood in for b.png
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is not reopened nor warned about again
        assert torch.equal(data[1]["image"], item["image"])
        _ = [data[i] for i in range(len(data))]
    assert data.num_skipped == 1


def test_folder_with_only_unreadable_files_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "a.txt").write_text("x")
    data = ImageFolderDataset(tmp_path, sample_size=8)
    with pytest.warns(UserWarning, match="skipping"), \
            pytest.raises(RuntimeError, match="none of the 1 images .* could be read"):
        data[0]


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"no images in '{tmp_path}'")):
        ImageFolderDataset(tmp_path, sample_size=8)
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "missing", sample_size=8)
    solid((1, 2, 3)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"in_channels=2 is not one of \[1, 3\]"):
        ImageFolderDataset(tmp_path, sample_size=8, in_channels=2)
    with pytest.raises(ValueError, match="sample_size=0 must be a positive int"):
        ImageFolderDataset(tmp_path, sample_size=0)
    (tmp_path / "a.txt").write_text("x")
    data = ImageFolderDataset(tmp_path, sample_size=8)
    with pytest.raises(IndexError, match="index=1 is out of range"):
        data[1]


LEVELS_16 = np.array([0, 16384, 32768, 49152, 65535], dtype=np.uint16)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_folder_scales_16_bit_greyscale_png(tmp_path, in_channels):
    """A 16-bit PNG is scaled, not clipped at 255 (PIL's convert("L") would make 32768 white)."""
    pixels = np.tile(np.repeat(LEVELS_16, 2), (10, 1))  # (10, 10): five bands of 2 columns
    Image.fromarray(pixels).save(tmp_path / "grey16.png")
    (tmp_path / "grey16.txt").write_text("bands")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    data = ImageFolderDataset(tmp_path, sample_size=10, in_channels=in_channels)
    image = data[0]["image"]
    assert image.shape == (in_channels, 10, 10) and image.dtype == torch.float32
    expected = torch.from_numpy(pixels / 65535 * 2 - 1).float()  # (10, 10)
    torch.testing.assert_close(image, expected.expand(in_channels, 10, 10), rtol=0, atol=1e-6)
    # resized (bicubic in float), the range still holds and mid-grey stays mid-grey
    Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    small = ImageFolderDataset(tmp_path, sample_size=8, in_channels=in_channels)[0]["image"]
    assert small.shape == (in_channels, 8, 8)
    torch.testing.assert_close(small, torch.full_like(small, 32768 / 65535 * 2 - 1))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_unit_float_image_scales_every_16_bit_mode(mode):
    """Every 16-bit greyscale mode maps 0 -> 0 and 65535 -> 1 (not 255 -> 1)."""
    byte_order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")  # N: native
    values = np.array([[0, 255, 32768, 65535]], dtype=byte_order)
    out = unit_float_image(Image.frombytes(mode, (4, 1), values.tobytes()))
    assert out.mode == "F"
    np.testing.assert_allclose(np.asarray(out), values.astype(np.float64) / 65535, rtol=1e-6)


def test_folder_16_bit_resize_overshoot_is_clipped_to_the_range(tmp_path):
    """Bicubic overshoots a hard black/white edge (by ~1% here); items stay within [-1, 1]."""
    edge = np.zeros((20, 20), dtype=np.uint16)
    edge[:, 10:] = 65535
    Image.fromarray(edge).save(tmp_path / "edge.png")
    (tmp_path / "edge.txt").write_text("edge")
    image = ImageFolderDataset(tmp_path, sample_size=8, in_channels=1)[0]["image"]
    assert image.min() == -1.0 and image.max() == 1.0


@pytest.mark.parametrize("array, expected", [
    (np.full((6, 6), 49152, dtype=">u2"), 49152 / 65535 * 2 - 1),  # I;16B
    (np.full((6, 6), 16384, dtype=np.int32), 16384 / 65535 * 2 - 1),  # I: older Pillow's 16-bit
    (np.full((6, 6), 0.25, dtype=np.float32), -0.5),  # F: [0, 1]
])
def test_folder_scales_other_high_depth_modes(tmp_path, array, expected):
    # PNG cannot hold these modes; PIL opens files by content, so a TIFF named .png stands in.
    Image.fromarray(array).save(tmp_path / "deep.png", format="TIFF")
    (tmp_path / "deep.txt").write_text("x")
    image = ImageFolderDataset(tmp_path, sample_size=6, in_channels=3)[0]["image"]
    torch.testing.assert_close(image, torch.full((3, 6, 6), expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("array, message", [
    (np.full((6, 6), 70000, dtype=np.int32),
     r"mode 'I' pixel values must lie in \[0, 65535\]; got values in \[70000, 70000\]"),
    (np.full((6, 6), np.nan, dtype=np.float32),
     r"mode 'F' pixel values must lie in \[0, 1\]; got values in \[nan, nan\]"),
])
def test_folder_skips_high_depth_values_out_of_range(tmp_path, array, message):
    Image.fromarray(array).save(tmp_path / "a.png", format="TIFF")
    solid((0, 0, 255), size=(6, 6)).save(tmp_path / "b.png")
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(name)
    data = ImageFolderDataset(tmp_path, sample_size=6)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*a\.png .*" + message):
        item = data[0]
    assert item["text"] == "b" and data.skipped == [tmp_path / "a.png"]


@pytest.mark.parametrize("second_line, message", [
    ('{"file_name": "gone.png", "text": "x"}',
     r"line 2 names file_name='gone.png', but .*gone\.png does not exist"),
    ('{"file_name": "a.png", "text": ', r"line 2 is not valid JSON"),
    ('{"file_name": "a.png"}', r"line 2 must be an object with string 'file_name' and 'text'"),
    ('["a.png", "x"]', r"line 2 must be an object"),
    ('{"file_name": "a.png", "text": "again"}', r"line 2 repeats file_name='a.png' .*line 1"),
    ('{"file_name": "notes.txt", "text": "x"}',
     r"line 2 names file_name='notes.txt', which is not an image"),
    ('{"file_name": "sub/../a.png", "text": "x"}',  # the same file, written another way
     r"line 2 repeats file_name='sub/../a.png' .*line 1"),
    ('{"file_name": "../a.png", "text": "x"}',
     r"line 2 names file_name='../a.png', which is not inside the folder"),
    ('{"file_name": "/etc/a.png", "text": "x"}',
     r"line 2 names file_name='/etc/a.png', which is not inside the folder"),
])
def test_folder_metadata_errors_name_the_line(tmp_path, second_line, message):
    solid((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    first_line = '{"file_name": "a.png", "text": "ok"}'
    (tmp_path / "metadata.jsonl").write_text(first_line + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(tmp_path, sample_size=8)


# ---- collate and build_dataset ----

def test_collate_makes_the_trainer_batch():
    data = ShapesDataset(size=8, sample_size=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert set(batch) == {"images", "prompts"}
    assert batch["images"].shape == (4, 3, 16, 16)
    assert batch["prompts"] == all_captions()[:4]
    with pytest.raises(ValueError, match="batch is empty"):
        collate([])
    with pytest.raises(ValueError, match="batch images differ in shape"):
        collate([data[0], ShapesDataset(size=1, sample_size=32)[0]])


def test_build_dataset_from_config(tmp_path):
    shapes = build_dataset(DiffusionConfig(sample_size=16, seed=2))
    assert isinstance(shapes, ShapesDataset) and shapes[0]["image"].shape == (3, 16, 16)
    assert torch.equal(shapes[5]["image"], ShapesDataset(sample_size=16, seed=2)[5]["image"])
    write_folder(tmp_path)
    config = DiffusionConfig(dataset="folder", data_dir=str(tmp_path), sample_size=8,
                             random_flip=True, seed=4)
    with pytest.warns(UserWarning, match="no caption"):
        folder = build_dataset(config)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 3
    assert folder.random_flip and folder.seed == 4 and folder[0]["image"].shape == (3, 8, 8)


def test_build_dataset_errors(tmp_path):
    base = dict(sample_size=16, seed=0, random_flip=False, in_channels=3)
    with pytest.raises(ValueError, match="dataset='folder' needs data_dir .*got data_dir=None"):
        build_dataset(SimpleNamespace(dataset="folder", data_dir=None, **base))
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=re.escape(f"got data_dir={missing!r}, which is not a "
                                                   "folder")):
        build_dataset(SimpleNamespace(dataset="folder", data_dir=missing, **base))
    with pytest.raises(ValueError, match=r"dataset='faces' is not one of \['shapes', 'folder'\]"):
        build_dataset(SimpleNamespace(dataset="faces", data_dir=None, **base))
    with pytest.raises(ValueError, match="in_channels=1 must be 3"):
        build_dataset(SimpleNamespace(dataset="shapes", data_dir=None,
                                      **{**base, "in_channels": 1}))
