"""rexnet-train augmentation against timm's definitions: independent per-stage random streams, the
``rand-m9-mstd0.5`` op set, probabilities and magnitudes, each op on a fixed image, and the crop.

Expected values are written from timm's level functions (timm/data/auto_augment.py of 2020) and computed
with PIL's ImageOps / ImageEnhance / affine transform, which is what timm calls; timm and torch are not
needed. Statistical checks use fixed seeds, so they are deterministic, with bounds several standard
errors wide.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from rexnet_serving.preprocess import IMAGENET_MEAN, PreprocessConfig, config_for
from rexnet_train.augment import (TrainTransform, derive_seed, random_erase, sample_crop,
                                  sample_erase, stage_rngs)
from rexnet_train.config import config_path, load_config
from rexnet_train.randaugment import (OP_NAMES, OPS, OpDraw, RandAugment, enhance_factor, mean_fill,
                                      posterize_bits, rotate_degrees, shear_factor, solarize_add_amount,
                                      solarize_threshold, translate_fraction)

SAMPLES = 20_000
IMAGE_SIZE = (400, 300)  # width, height of the images whose draws are studied
TIMM_RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                        "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                        "TranslateXRel", "TranslateYRel")
FILL = (124, 116, 104)  # timm img_mean: round(255 * (0.485, 0.456, 0.406))


def _recipe_transform(**changes) -> TrainTransform:
    augment = dict(load_config(config_path("ReXNet_1_0"))["Augment"], **changes)
    return TrainTransform.from_config(augment, config_for("ReXNet_1_0"))


def _image(width: int = 48, height: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


@pytest.fixture(scope="module")
def draws():
    """The recipe's draws for 20,000 sample seeds of epoch 0, as the data set derives them."""
    transform = _recipe_transform()
    return [transform.sample(derive_seed(7, 0, i), IMAGE_SIZE) for i in range(SAMPLES)]


# -- independent streams --------------------------------------------------------------------------
def _crop_features(d):
    top, left, h, w = d.crop
    return (top / max(1, IMAGE_SIZE[1] - h), left / max(1, IMAGE_SIZE[0] - w),
            h * w / (IMAGE_SIZE[0] * IMAGE_SIZE[1]))


def test_crop_randaugment_and_erasing_draw_from_independent_streams(draws):
    crop = np.array([_crop_features(d) for d in draws])
    first_op = np.array([OP_NAMES.index(d.ops[0].name) for d in draws])
    first_applied = np.array([d.ops[0].applied for d in draws])
    first_magnitude = np.array([d.ops[0].magnitude for d in draws])
    first_negate = np.array([d.ops[0].negate for d in draws])
    flip = np.array([d.flip for d in draws])
    erased = np.array([d.erase is not None for d in draws])
    pairs = {
        "crop top / first op": (crop[:, 0], first_op),
        "crop left / first op": (crop[:, 1], first_op),
        "crop area / first op applied": (crop[:, 2], first_applied),
        "crop top / first magnitude": (crop[:, 0], first_magnitude),
        "flip / first sign": (flip, first_negate),
        "crop area / erased": (crop[:, 2], erased),
        "first op / erased": (first_op, erased),
        "first magnitude / erased": (first_magnitude, erased),
    }
    # Independent: |r| ~ 1/sqrt(20000) = 0.007; the bound is 7 standard errors.
    for what, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < 0.05, what


def test_the_independence_check_detects_streams_seeded_alike():
    """The check above has teeth: the crop and erasing stages fed generators seeded alike (the old
    code's mistake, one seed for two stages) correlate strongly, since both start from one number."""
    areas, erased = [], []
    for i in range(SAMPLES):
        seed = derive_seed(7, 0, i)
        top, left, h, w = sample_crop(np.random.default_rng(seed), *IMAGE_SIZE, (0.08, 1.0), (3 / 4, 4 / 3))
        areas.append(h * w)
        erased.append(sample_erase(np.random.default_rng(seed), 224, 224, 0.2) is not None)
    assert abs(_corr(areas, erased)) > 0.5


def test_stage_streams_are_reproducible_and_differ_between_stages():
    a, b = stage_rngs(123), stage_rngs(123)
    assert [r.random() for r in a.values()] == [r.random() for r in b.values()]
    firsts = [r.random() for r in stage_rngs(5).values()]
    assert len(set(firsts)) == len(firsts)


# -- RandAugment rand-m9-mstd0.5: op set, probabilities, magnitudes ---------------------------------
def test_op_set_is_timms_rand_transforms():
    assert OP_NAMES == TIMM_RAND_TRANSFORMS
    assert "Identity" not in OPS


def test_two_picks_uniform_with_replacement_each_half_the_time(draws):
    picks = [op for d in draws for op in d.ops]
    assert all(len(d.ops) == 2 for d in draws)
    counts = np.bincount([OP_NAMES.index(op.name) for op in picks], minlength=15)
    expected = len(picks) / 15  # 2667; sd 50
    assert np.all(np.abs(counts - expected) < 300), counts
    assert sum(d.ops[0].name == d.ops[1].name for d in draws) > 0.04 * SAMPLES  # replacement: ~1/15
    applied = np.mean([op.applied for op in picks])
    assert abs(applied - 0.5) < 0.02  # timm rand_augment_ops(prob=0.5); sd 0.0025
    assert abs(np.mean([op.negate for op in picks]) - 0.5) < 0.02
    assert abs(np.mean([op.resample == Image.BICUBIC for op in picks]) - 0.5) < 0.02


def test_magnitude_is_normal_around_9_with_std_half_clipped_to_0_10(draws):
    m = np.array([op.magnitude for d in draws for op in d.ops])
    assert m.min() >= 0.0 and m.max() <= 10.0
    assert len(np.unique(m)) > 0.9 * m.size  # drawn per pick, not once per sample or run
    # N(9, 0.5) clipped at 10: P(m = 10) = P(z > 2) = 0.0228; the mean and std change by < 0.01.
    assert abs(np.mean(m == 10.0) - 0.0228) < 0.005
    assert abs(m.mean() - 9.0) < 0.02 and abs(m.std() - 0.5) < 0.02
    # Within a sample the two picks draw separate magnitudes.
    assert abs(_corr([d.ops[0].magnitude for d in draws], [d.ops[1].magnitude for d in draws])) < 0.05


@pytest.mark.parametrize("m, threshold, bits, add, factor, degrees, shear, translate", [
    (9.0, 230, 3, 99, 1.72, 27.0, 0.27, 0.405),
    (10.0, 256, 4, 110, 1.9, 30.0, 0.3, 0.45),
    (5.0, 128, 2, 55, 1.0, 15.0, 0.15, 0.225),
    (0.0, 0, 0, 0, 0.1, 0.0, 0.0, 0.0),
])
def test_level_functions_match_timm(m, threshold, bits, add, factor, degrees, shear, translate):
    assert solarize_threshold(m) == threshold  # int(m / 10 * 256)
    assert posterize_bits(m) == bits  # int(m / 10 * 4), timm's 'Posterize' (not Increasing/Original)
    assert solarize_add_amount(m) == add  # int(m / 10 * 110)
    assert enhance_factor(m) == pytest.approx(factor)  # m / 10 * 1.8 + 0.1, no random sign
    assert rotate_degrees(m, False) == pytest.approx(degrees)
    assert rotate_degrees(m, True) == pytest.approx(-degrees)
    assert shear_factor(m, True) == pytest.approx(-shear)
    assert translate_fraction(m, False) == pytest.approx(translate)  # timm translate_pct 0.45


def _expected_at_m9(name: str, img: Image.Image, negate: bool) -> np.ndarray:
    """timm's op at magnitude 9 with bilinear resampling, written out with PIL / numpy."""
    a = np.asarray(img)
    s = -1.0 if negate else 1.0
    w, h = img.size
    affine = lambda matrix: img.transform(img.size, Image.AFFINE, matrix,  # noqa: E731
                                          resample=Image.BILINEAR, fillcolor=FILL)
    expected = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: 255 - a,
        "Rotate": lambda: img.rotate(27.0 * s, resample=Image.BILINEAR, fillcolor=FILL),
        "Posterize": lambda: a & 0b11100000,  # keep 3 bits
        "Solarize": lambda: np.where(a >= 230, 255 - a, a),
        "SolarizeAdd": lambda: np.where(a < 128, np.minimum(255, a.astype(int) + 99), a),
        "Color": lambda: ImageEnhance.Color(img).enhance(1.72),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(1.72),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(1.72),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(1.72),
        "ShearX": lambda: affine((1, 0.27 * s, 0, 0, 1, 0)),
        "ShearY": lambda: affine((1, 0, 0, 0.27 * s, 1, 0)),
        "TranslateXRel": lambda: affine((1, 0, 0.405 * s * w, 0, 1, 0)),
        "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, 0.405 * s * h)),
    }[name]()
    return np.asarray(expected, dtype=np.uint8)


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("name", TIMM_RAND_TRANSFORMS)
def test_each_op_at_magnitude_9_matches_timm_on_a_fixed_image(name, negate):
    img = _image()
    out = RandAugment(fill=FILL).apply(img, [OpDraw(name, True, 9.0, negate, Image.BILINEAR)])
    assert out.size == img.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), _expected_at_m9(name, img, negate)), name
    skipped = RandAugment(fill=FILL).apply(img, [OpDraw(name, False, 9.0, negate, Image.BILINEAR)])
    assert np.array_equal(np.asarray(skipped), np.asarray(img))


def test_geometric_ops_fill_with_the_dataset_mean_and_use_the_drawn_filter():
    assert mean_fill(IMAGENET_MEAN) == FILL
    img = _image()
    out = np.asarray(OPS["TranslateXRel"](img, OpDraw("TranslateXRel", True, 10.0, False,
                                                      Image.BICUBIC), FILL))
    assert np.all(out[:, -20:] == FILL)  # 45 % of 48 px moved in from the right edge
    bicubic = OPS["Rotate"](img, OpDraw("Rotate", True, 9.0, False, Image.BICUBIC), FILL)
    assert np.array_equal(np.asarray(bicubic),
                          np.asarray(img.rotate(27.0, resample=Image.BICUBIC, fillcolor=FILL)))
    assert _recipe_transform().randaugment.fill == FILL  # from the normalisation mean


# -- crop, flip, erasing --------------------------------------------------------------------------
def test_crop_boxes_fit_and_resize_picks_bilinear_or_bicubic(draws):
    for d in draws[:2000]:
        top, left, h, w = d.crop
        assert 0 <= top <= IMAGE_SIZE[1] - h and 0 <= left <= IMAGE_SIZE[0] - w and h > 0 and w > 0
    assert {d.resample for d in draws} == {Image.BILINEAR, Image.BICUBIC}
    assert abs(np.mean([d.resample == Image.BICUBIC for d in draws]) - 0.5) < 0.02
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.02
    assert abs(np.mean([d.erase is not None for d in draws]) - 0.2) < 0.02  # --reprob 0.2
    area = np.array([_crop_features(d)[2] for d in draws])
    assert area.min() >= 0.07 and area.max() <= 1.0


def test_a_fixed_interpolation_applies_to_crop_and_ops():
    transform = _recipe_transform(interpolation="bicubic")
    d = transform.sample(3, IMAGE_SIZE)
    assert d.resample == Image.BICUBIC and {op.resample for op in d.ops} == {Image.BICUBIC}


def test_transform_is_crop_resize_flip_then_normalise():
    """Without RandAugment and erasing the output is the drawn crop, resized with the drawn filter."""
    transform = _recipe_transform(crop_size=32, randaugment_ops=0, random_erasing_prob=0.0)
    img = _image(120, 90)
    norm = PreprocessConfig()
    for seed in range(6):
        d = transform.sample(seed, img.size)
        top, left, h, w = d.crop
        ref = img.crop((left, top, left + w, top + h)).resize((32, 32), d.resample)
        if d.flip:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        ref = (np.asarray(ref, np.float32).transpose(2, 0, 1) / 255.0
               - np.reshape(norm.mean, (3, 1, 1))) / np.reshape(norm.std, (3, 1, 1))
        np.testing.assert_allclose(transform(img, seed), ref, atol=1e-5)


def test_random_erase_fills_one_rectangle_with_noise():
    chw = np.zeros((3, 32, 32), np.float32)
    out = random_erase(chw.copy(), 1.0, np.random.default_rng(0))
    rows, cols = np.nonzero(np.any(out != 0, axis=0))
    assert rows.size > 0
    box = out[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert np.all(box != 0) and abs(float(box.mean())) < 0.5  # a filled box of N(0, 1) values
    assert np.array_equal(random_erase(chw.copy(), 0.0, np.random.default_rng(0)), chw)
    boxes = [sample_erase(np.random.default_rng(s), 224, 224, 1.0) for s in range(500)]
    areas = np.array([b[2] * b[3] / 224**2 for b in boxes if b is not None])
    assert areas.min() >= 0.015 and areas.max() <= 0.34  # timm: 2 % .. 1/3 of the image


def test_train_transform_is_seeded_per_sample_and_leaves_global_rngs_alone():
    import random
    transform = _recipe_transform(crop_size=32)
    img = _image()
    np_state, py_state = np.random.get_state(), random.getstate()
    first = transform(img, 123)
    assert first.shape == (3, 32, 32) and first.dtype == np.float32
    assert np.array_equal(first, transform(img, 123))
    assert not np.array_equal(first, transform(img, 124))
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
