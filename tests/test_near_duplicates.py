"""Near-duplicates: sparse look-alikes are kept, copies are caught (grey and RGB), the batch
numbers equal the per-image ones, and the sheet shows the pairs that were removed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw, features

from synthloop.config import CleanConfig, ConfigError, parse_params
from synthloop.dataset import read_columns
from tasks.clean import (
    Rejection,
    candidates,
    convert_image,
    decode_chunk,
    resolve_duplicates,
    run_clean,
)
from tasks.clean import image_numbers as numbers
from tasks.clean import near_duplicates as nd
from tasks.clean import sheet as sheets
from tasks.clean.report import sheet_pairs
from tasks.ingest.stage import run_ingest
from tests.conftest import REPO, small_params

SPARSE = CleanConfig(image_size=28, channels=1, labels=None)
DENSE = CleanConfig(image_size=32, channels=3, labels=None)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def character_drawings(count: int, seed: int = 0, side: int = 105) -> list[Image.Image]:
    """`count` people's drawings of one character: the same three strokes, each point
    jittered by ~3% of the side, thin dark ink on white (the issue's handwriting)."""
    rng = np.random.default_rng(seed)
    strokes = [rng.uniform(0.2, 0.8, size=(4, 2)) * side for _ in range(3)]
    drawings = []
    for _ in range(count):
        image = Image.new("L", (side, side), 255)
        pen = ImageDraw.Draw(image)
        width = int(rng.integers(2, 4))
        for stroke in strokes:
            points = stroke + rng.normal(0, 0.03 * side, size=stroke.shape)
            pen.line([tuple(p) for p in points.tolist()], fill=0, width=width, joint="curve")
        drawings.append(image)
    return drawings


def photos(count: int, seed: int = 0, side: int = 64) -> list[Image.Image]:
    """Dense RGB images: a smooth colour field, fine noise and an ellipse. (Pure pixel
    noise, as in synthloop.procedural, moves the dHash itself under JPEG.)"""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        field = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
        base = np.asarray(field.resize((side, side), Image.Resampling.BICUBIC), np.float32)
        noisy = np.clip(base + rng.normal(0, 8, size=base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(noisy)
        x, y = rng.uniform(0.3, 0.7, size=2) * side
        r = rng.uniform(0.1, 0.2) * side
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
        out.append(image)
    return out


def copies(image: Image.Image) -> dict[str, bytes]:
    """Copies that clean must catch: re-encoded, resized, with an alpha channel, cropped."""
    alpha = "LA" if image.mode == "L" else "RGBA"
    made = {
        "jpeg": encode(image, "JPEG", quality=85),
        "resized": encode(image.resize((image.width * 3 // 2,) * 2, Image.Resampling.BICUBIC)),
        "alpha": encode(image.convert(alpha)),
        # a few pixels off each edge (under 3% of the side), scaled back up by clean
        "cropped": encode(image.crop((1, 2, image.width - 2, image.height - 1))),
    }
    if features.check("webp"):
        made["webp"] = encode(image, "WEBP", quality=90)
    return made


def dedupe(ids: list[str], images: list[bytes], cfg: CleanConfig, crop_keys: bool = True):
    """clean's per-image pass and duplicate rules on in-memory images (without the crop
    keys' candidates if asked)."""
    chunk = decode_chunk(["x"] * len(images), images, cfg)
    assert chunk.kept == list(range(len(images))), chunk.rejected
    return resolve_duplicates(
        np.array(ids, dtype=object),
        np.array(["x"] * len(ids), dtype=object),
        chunk.pixel_hashes,
        chunk.dhashes,
        chunk.thumbnails,
        cfg.near_duplicate_distance,
        cfg.near_duplicate_difference,
        cfg.near_duplicate_contrast,
        cfg.near_duplicate_local,
        crop_dhashes=chunk.crop_dhashes if crop_keys else None,
        crop_share=numbers.key_share(cfg.image_size),
    )


def test_distinct_drawings_of_one_character_are_all_kept():
    drawings = character_drawings(24)
    images = [encode(d) for d in drawings]
    chunk = decode_chunk(["x"] * len(images), images, SPARSE)
    # The dHash alone pairs some of them up: the confirmation is what keeps them.
    assert len(candidates.near_duplicate_pairs(chunk.dhashes, SPARSE.near_duplicate_distance))
    keep, why = dedupe([f"d{i:02d}" for i in range(len(images))], images, SPARSE)
    assert keep.all(), [w for w in why if w]


@pytest.mark.parametrize(
    ("cfg", "originals"),
    [(SPARSE, character_drawings(4, seed=1)), (DENSE, photos(4, seed=2))],
    ids=["grey", "rgb"],
)
def test_reencoded_resized_alpha_and_cropped_copies_are_caught(cfg, originals):
    ids, images, of = [], [], {}  # of: copy id -> its original's id
    for k, original in enumerate(originals):
        ids.append(f"a{k}")
        images.append(encode(original))
        made = copies(original)
        if cfg.channels == 3:
            # A 3% crop of a noisy photo, aligned, still differs by more than
            # clean.near_duplicate_local along its edges: the cost of keeping look-alike
            # real photos (benchmarks/near_duplicates.py prints the crops' recall).
            del made["cropped"]
        for name, data in made.items():
            ids.append(f"b{k}-{name}")  # ids rank after their original's: the copy goes
            images.append(data)
            of[ids[-1]] = f"a{k}"
    keep, why = dedupe(ids, images, cfg)
    for i, row in enumerate(ids):
        if row in of:
            assert not keep[i], row
            assert why[i].reason in ("near_duplicate", "exact_duplicate"), (row, why[i])
            assert why[i].detail.endswith(of[row]), (row, why[i].detail)
        else:
            assert keep[i], (row, why[i])


def garment(side: int, printed: bool = False, seed: int = 0) -> Image.Image:
    """A product photo as Fashion-MNIST's: a sweater's silhouette on black, knitted (stripes
    4 px apart at 28 px, shaded across, grain) and, if `printed`, with four bright dots."""
    s = side / 28
    outline = [(8, 2), (20, 2), (26, 8), (22, 11), (21, 26), (7, 26), (6, 11), (2, 8)]
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon([(x * s, y * s) for x, y in outline], fill=255)
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(seed)
    shade = 140 + 50 * np.sin(2 * np.pi * 7 * y) + 30 * x + rng.normal(0, 12, size=x.shape)
    if printed:
        for cx, cy in rng.uniform(0.35, 0.75, size=(4, 2)):
            shade += 100 * (((x - cx) ** 2 + (y - cy) ** 2) < 0.06**2)
    pixels = np.where(np.asarray(mask) > 0, np.clip(shade, 0, 255), 0).astype(np.uint8)
    return Image.fromarray(pixels)


def cropped(image: Image.Image, k: int) -> bytes:
    """The image with k px cut off each edge (clean scales it back to its size)."""
    return encode(image.crop((k, k, image.width - k, image.height - k)))


@pytest.mark.parametrize(("side", "k"), [(28, 1), (56, 2)], ids=["28px-1", "56px-2"])
def test_a_copy_cropped_a_pixel_a_side_is_found_through_the_crop_key(side, k):
    """Cleaned at 28 px, a crop of a pixel a side (of 28, or 2 of 56) magnifies the photo by
    7%: its dHash moves past the candidates' distance, and only the crop key finds it."""
    original = garment(side)
    images = [encode(original), cropped(original, k)]
    keep, why = dedupe(["a", "b"], images, SPARSE)
    assert keep.tolist() == [True, False], why
    assert why[1].reason == "near_duplicate" and why[1].detail.endswith(" a")
    assert dedupe(["a", "b"], images, SPARSE, crop_keys=False)[0].all()


def test_distinct_photos_with_one_silhouette_are_kept_and_their_crops_removed():
    """A plain sweater and two printed ones, one silhouette and one knit: distinct photos,
    kept; a copy of each cropped by a pixel a side goes, for its own original."""
    photos_ = [garment(28), garment(28, printed=True, seed=0), garment(28, printed=True, seed=1)]
    ids = ["a0", "a1", "a2", "b0", "b1", "b2"]
    images = [encode(p) for p in photos_] + [cropped(p, 1) for p in photos_]
    keep, why = dedupe(ids, images, SPARSE)
    assert keep.tolist() == [True] * 3 + [False] * 3, why
    for k in range(3):
        assert why[3 + k].detail.endswith(f" a{k}"), why[3 + k]


def test_a_shape_moved_across_its_own_brightness_is_kept(monkeypatch):
    """Two photos that differ only by where a red disc of the background's brightness
    sits: grey thumbnails hardly tell them apart, the colour planes do."""
    rng = np.random.default_rng(3)
    # dark to light top to bottom, but grey 120 across the band the disc moves along
    brightness = np.clip(np.linspace(-60, 300, 64), 0, 255)
    brightness[16:48] = 120
    field = np.repeat(brightness[:, None, None], 64, axis=1) + rng.normal(0, 2, (64, 64, 1))
    field = np.clip(field + np.array([-10.0, 10.0, 0.0]), 0, 255).astype(np.uint8)
    red = (190, 80, 90)  # grey (190 + 80 + 90) / 3 = 120: the band's brightness
    pictures = []
    for x in (20, 42):
        image = Image.fromarray(field)
        ImageDraw.Draw(image).ellipse((x - 9, 22, x + 9, 40), fill=red)
        pictures.append(encode(image))
    chunk = decode_chunk(["x", "x"], pictures, DENSE)
    difference, _, colour = nd.relative_difference(chunk.thumbnails[:1], chunk.thumbnails[1:])
    assert difference[0] <= DENSE.near_duplicate_difference  # grey alone would confirm it
    assert colour[0] > nd.COLOUR

    def confirmed() -> int:  # every pair a candidate: what the confirmation decides
        bounds = (
            64,
            DENSE.near_duplicate_difference,
            DENSE.near_duplicate_contrast,
            DENSE.near_duplicate_local,
        )
        return len(nd.confirmed_pairs(chunk.dhashes, chunk.thumbnails, np.arange(2), *bounds))

    assert confirmed() == 0
    monkeypatch.setattr(nd, "COLOUR", np.inf)
    assert confirmed() == 1


def test_a_few_pixels_cropped_are_aligned_before_comparing():
    """On thin strokes a 2 px crop differs, plain, as much as another hand does; aligned
    it is close, while another drawing of the character stays far."""
    first, other = character_drawings(2, seed=4)
    cropped = first.crop((2, 1, first.width - 1, first.height - 2))
    rows = decode_chunk(["x"] * 3, [encode(first), encode(cropped), encode(other)], SPARSE)
    thumbs = rows.thumbnails
    difference, _, _ = nd.pair_differences(thumbs, np.array([0, 0]), np.array([1, 2]))
    assert difference[0] <= SPARSE.near_duplicate_difference < difference[1]
    assert _plain(thumbs[0], thumbs[1]) > SPARSE.near_duplicate_difference  # plain: missed
    side = numbers.thumbnail_side(SPARSE.image_size, SPARSE.near_duplicate_size)
    assert side >= nd.ALIGN_MIN_SIDE
    # 8x8 thumbnails (the demo's digits) are too small to align: compared plain only
    small = [np.asarray(i.resize((8, 8), Image.Resampling.BILINEAR)) for i in (first, cropped)]
    flat = numbers.thumbnails(np.stack(small), 8)
    plain, _, _ = nd.relative_difference(flat[:1], flat[1:])
    assert np.isclose(plain[0], _plain(flat[0], flat[1]))


def _plain(a: np.ndarray, b: np.ndarray) -> float:
    """The plain comparison: mean absolute difference of the standardised rows."""
    rows = np.stack([a, b]).astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.sqrt((rows * rows).mean(axis=1, keepdims=True)), nd.MIN_SCALE)
    return float(np.abs(rows[0] - rows[1]).mean())


def test_batch_numbers_equal_the_per_image_ones():
    rng = np.random.default_rng(0)
    for shape in ((7, 28, 28), (5, 32, 32, 3)):
        stack = rng.integers(0, 256, size=shape, dtype=np.uint8)
        gray = numbers.grays(stack)
        for side in (8, 16, 28):
            expected = np.stack([numbers.thumbnail(p, side) for p in stack])
            np.testing.assert_array_equal(numbers.thumbnails(stack, side), expected)
        assert numbers.dhashes(gray).tolist() == [numbers.dhash(p) for p in stack]
        assert numbers.crop_dhashes(gray).tolist() == [numbers.crop_dhash(p) for p in stack]


def test_brightness_is_ignored_and_contrast_is_bounded():
    image = numbers.thumbnail(np.asarray(character_drawings(1)[0].resize((28, 28))), 16)[None]
    darker = np.clip(image.astype(np.int16) - 20, 0, 255).astype(np.uint8)
    faint = (image // 3 + 170).astype(np.uint8)
    difference, ratio, _ = nd.relative_difference(image, darker)
    assert difference[0] < 0.01 and ratio[0] < 1.25
    difference, ratio, _ = nd.relative_difference(image, faint)
    assert ratio[0] > 2.5  # the same strokes at a third of the contrast: not a copy


def test_drop_order_keeps_the_first_of_a_chain():
    dropped, keepers = nd.drop_order(np.array([[0, 1], [1, 2], [3, 4]]), 5)
    assert dropped.tolist() == [1, 4] and keepers.tolist() == [0, 3]


def test_sheet_pairs_are_the_first_removed_ids_with_their_keepers():
    ids = np.array(["e", "a", "d", "c", "b"], dtype=object)
    rejections = [
        Rejection("near_duplicate", "", keeper=1),
        None,
        Rejection("exact_duplicate", "same pixels as a"),
        Rejection("near_duplicate", "", keeper=4),
        None,
    ]
    assert sheet_pairs(ids, rejections, 5).tolist() == [[3, 4], [0, 1]]
    assert sheet_pairs(ids, rejections, 1).tolist() == [[3, 4]]
    assert sheet_pairs(ids, rejections, 0).shape == (0, 2)


def test_sheet_puts_each_removed_image_left_of_its_keeper():
    a = np.zeros((8, 8), np.uint8)
    b = np.full((8, 8, 3), 200, np.uint8)
    sheet = sheets.sheet([(a, b)] * 5, per_row=4)
    assert sheet.size == sheets.sheet_size(5, per_row=4)
    pixels = np.asarray(sheet)
    x, y = sheets._PAIR_GAP, sheets._GAP
    assert (pixels[y : y + sheets.SHEET_CELL, x : x + sheets.SHEET_CELL] == 0).all()
    x += sheets.SHEET_CELL + sheets._GAP
    assert (pixels[y : y + sheets.SHEET_CELL, x : x + sheets.SHEET_CELL] == 200).all()
    assert sheets.sheet([]).size == sheets.sheet_size(0)


def test_clean_writes_the_sheet_of_what_it_removed(tmp_path):
    folder = tmp_path / "raw" / "shapes"
    for k, image in enumerate(photos(6, seed=3)):
        cls = folder / "ab"[k % 2]
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{k:02d}.png").write_bytes(encode(image))
        if k < 3:  # three JPEG copies, ids after their originals'
            (cls / f"{k:02d}z.jpg").write_bytes(encode(image, "JPEG", quality=90))
    raw = small_params("raw/shapes", image_size=32, labels=None, min_class_count=1)
    raw["clean"]["near_duplicate_sheet_pairs"] = 2
    params = parse_params(raw, root=tmp_path)
    run_ingest(params.ingest)
    report = run_clean(params.clean, validate=False)

    rows = pq.read_table(params.clean.quarantine).to_pylist()
    removed = sorted((r for r in rows if r["reason"] == "near_duplicate"), key=lambda r: r["id"])
    assert sorted(Path(r["path"]).name for r in removed) == ["00z.jpg", "01z.jpg", "02z.jpg"]
    assert report["quarantined"]["near_duplicate"] == 3
    assert report["near_duplicate_sheet"]["pairs"] == 2
    sheet = Image.open(params.clean.near_duplicate_sheet)
    assert sheet.size == sheets.sheet_size(2)
    # Left: the first removed row (by id) as clean converted it; right: the row it matched.
    pixels = np.asarray(sheet.convert("RGB"))
    x, y, cell = sheets._PAIR_GAP, sheets._GAP, sheets.SHEET_CELL

    def cell_at(x: int) -> np.ndarray:
        return pixels[y : y + cell, x : x + cell]

    data = Path(removed[0]["path"]).read_bytes()
    np.testing.assert_array_equal(
        cell_at(x), np.asarray(sheets._cell(convert_image(data, params.clean).pixels))
    )
    keeper = removed[0]["detail"].rsplit(" ", 1)[-1]
    kept = read_columns(params.clean.output / "train", ["id", "path"]).to_pylist()
    kept += read_columns(params.clean.output / "val", ["id", "path"]).to_pylist()
    kept += read_columns(params.clean.output / "test", ["id", "path"]).to_pylist()
    original = Path(removed[0]["path"]).with_name(Path(removed[0]["path"]).stem[:2] + ".png")
    assert Path(next(r["path"] for r in kept if r["id"] == keeper)) == original
    data = original.read_bytes()
    np.testing.assert_array_equal(
        cell_at(x + cell + sheets._GAP),
        np.asarray(sheets._cell(convert_image(data, params.clean).pixels)),
    )


def test_an_absolute_difference_from_before_is_refused_by_name(tmp_path):
    raw = small_params(near_duplicate_difference=3.0)
    with pytest.raises(ConfigError) as err:
        parse_params(raw, root=tmp_path, check_paths=False)
    assert "clean.near_duplicate_difference" in str(err.value)
    assert "relative" in str(err.value)


def test_near_duplicate_defaults_equal_params_yaml():
    clean = yaml.safe_load((REPO / "params.yaml").read_text())["clean"]
    fields = CleanConfig.model_fields
    for name in (
        "near_duplicate_distance",
        "near_duplicate_size",
        "near_duplicate_difference",
        "near_duplicate_contrast",
        "near_duplicate_local",
        "near_duplicate_sheet_pairs",
    ):
        assert fields[name].default == clean[name], name


def test_clean_report_artifact_shows_the_sheet_only_with_pairs(tmp_path):
    from flows.summaries import clean_summary_markdown

    png = tmp_path / "near_duplicates.png"
    sheets.sheet([]).save(png)
    report = {"kept": 1, "ingested": 2, "quarantined_total": 1, "per_class": {}}
    report["quarantined"] = {"near_duplicate": 1}
    shown = clean_summary_markdown(report | {"near_duplicate_sheet": {"pairs": 1}}, png)
    assert str(png) in shown and "data:image/png;base64," in shown
    empty = clean_summary_markdown(report | {"near_duplicate_sheet": {"pairs": 0}}, png)
    assert "data:image/png" not in empty


def garments(side: int = 72) -> tuple[Image.Image, Image.Image]:
    """Two product photos as a catalogue takes them: the same dress silhouette centred on
    black, one plain, one with a printed band of dots across the waist (the issue's plain
    and patterned dresses)."""
    image = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(image)
    s = side / 72
    pen.polygon([(26 * s, 6 * s), (46 * s, 6 * s), (58 * s, 66 * s), (14 * s, 66 * s)], fill=170)
    pen.rectangle((20 * s, 6 * s, 52 * s, 20 * s), fill=150)  # a bodice a shade darker
    plain = image.copy()
    pen = ImageDraw.Draw(image)
    for x in range(24, 50, 7):  # a row of dots across the waist: the print
        pen.ellipse((x * s, 30 * s, (x + 4) * s, 34 * s), fill=70)
    return plain, image


def test_look_alike_photos_are_kept_and_their_copies_removed():
    """Two distinct photos with one silhouette are both kept; re-encoded, resized and
    2-pixel-cropped copies of one of them are removed, each for that one."""
    plain, printed = garments()
    copies = {
        "jpeg": encode(plain, "JPEG", quality=85),
        "resized": encode(plain.resize((100, 100), Image.Resampling.BICUBIC)),
        "cropped": encode(plain.crop((2, 0, plain.width, plain.height - 2))),
    }
    images = [encode(plain), encode(printed), *copies.values()]
    rows = decode_chunk(["dress"] * len(images), images, SPARSE)
    # The look-alikes are candidates (their dHashes agree): the confirmation must tell them.
    assert int(rows.dhashes[0] ^ rows.dhashes[1]).bit_count() <= SPARSE.near_duplicate_distance

    def resolve(local: float) -> tuple[np.ndarray, list]:
        return resolve_duplicates(
            np.array(["a", "b", "c", "d", "e"], dtype=object),
            np.array(["dress"] * len(images), dtype=object),
            rows.pixel_hashes,
            rows.dhashes,
            rows.thumbnails,
            SPARSE.near_duplicate_distance,
            SPARSE.near_duplicate_difference,
            SPARSE.near_duplicate_contrast,
            local,
        )

    keep, why = resolve(SPARSE.near_duplicate_local)
    assert keep.tolist() == [True, True, False, False, False]
    assert all(w.reason == "near_duplicate" and w.detail.endswith(" a") for w in why[2:])
    # Without the local bound the print is taken for a copy of the plain dress.
    assert not resolve(np.inf)[0][1]
