"""Tests of weak/strong augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from selmix_jax.data import augment


def _images(b, h, c, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, h, h, c))


def _keys(b, step=0):
  return augment.example_keys(jax.random.PRNGKey(42), step, jnp.arange(b))


def test_example_keys_depend_on_step_and_index_only():
  a = augment.example_keys(jax.random.PRNGKey(0), 5, jnp.asarray([3, 7]))
  b = augment.example_keys(jax.random.PRNGKey(0), 5, jnp.asarray([7]))
  np.testing.assert_array_equal(a[1], b[0])
  c = augment.example_keys(jax.random.PRNGKey(0), 6, jnp.asarray([3, 7]))
  assert not np.array_equal(a, c)


def test_typed_keys_work():
  keys = augment.example_keys(jax.random.key(0), 1, jnp.arange(2))
  out = jax.jit(augment.weak_batch)(_images(2, 8, 3), keys)
  assert out.shape == (2, 8, 8, 3)


def test_weak_crop_is_a_translation_of_the_padded_image():
  images = _images(16, 8, 3)
  out = jax.jit(augment.weak_batch)(images, _keys(16))
  assert out.shape == images.shape
  flips = 0
  for image, result in zip(np.asarray(images), np.asarray(out)):
    matches = []
    for flip in (False, True):
      src = image[:, ::-1] if flip else image
      padded = np.pad(src, ((4, 4), (4, 4), (0, 0)), mode="reflect")
      matches += [
        (flip, dy, dx)
        for dy in range(9)
        for dx in range(9)
        if np.array_equal(padded[dy : dy + 8, dx : dx + 8], result)
      ]
    assert matches, "weak output is not a crop of the padded (flipped) image"
    flips += matches[0][0]
  assert 0 < flips < 16


@pytest.mark.parametrize("shape", [(4, 8, 8, 1), (4, 16, 16, 3)])
def test_strong_shape_range_and_determinism(shape):
  images = _images(*shape[:2], shape[3])
  fn = jax.jit(augment.strong_batch)
  a, b = fn(images, _keys(4)), fn(images, _keys(4))
  c = fn(images, _keys(4, step=1))
  assert a.shape == images.shape and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Cutout leaves a gray square in every image.
  side = shape[1] // 2
  gray = np.isclose(np.asarray(a), 0.5).all(-1)
  assert (gray.reshape(4, -1).sum(-1) >= side).all()


# Every op at levels 0 and 1, as one compiled call per image shape.
_NUM_OPS = len(augment.OPS)
_OP_INDEX = jnp.repeat(jnp.arange(_NUM_OPS), 2)
_LEVEL = jnp.tile(jnp.asarray([0.0, 1.0]), _NUM_OPS)
_all_ops = jax.jit(jax.vmap(augment.apply_op, in_axes=(None, 0, 0)))


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_preserves_shape_and_range(channels):
  image = _images(1, 8, channels)[0]
  out = np.asarray(_all_ops(image, _OP_INDEX, _LEVEL)).reshape(_NUM_OPS, 2, 8, 8, channels)
  assert (out >= 0).all() and (out <= 1).all()
  names = augment.OP_NAMES
  np.testing.assert_array_equal(out[names.index("Identity")], np.stack([image] * 2))
  for name in ("Brightness", "Solarize", "Rotate", "TranslateX", "Sharpness", "Posterize"):
    assert not np.allclose(out[names.index(name)], np.stack([image] * 2)), name
  # Color on one channel is the identity.
  if channels == 1:
    np.testing.assert_allclose(out[names.index("Color")], np.stack([image] * 2), atol=1e-6)
  # Brightness at factor 0.05 is 5% of the image (PIL ImageEnhance semantics).
  np.testing.assert_allclose(out[names.index("Brightness"), 0], 0.05 * image, atol=1e-6)


def test_equalize_and_posterize_match_pil():
  # A low-contrast 24x24 image, so that equalisation is not the identity.
  u8 = np.asarray(60 + _images(1, 24, 3)[0] * 50).round().astype(np.uint8)
  out = np.asarray(_all_ops(jnp.asarray(u8 / 255.0, jnp.float32), _OP_INDEX, _LEVEL))
  out = np.round(out * 255).astype(np.uint8).reshape(_NUM_OPS, 2, 24, 24, 3)
  assert not np.array_equal(out[augment.OP_NAMES.index("Equalize"), 0], u8)
  pil = PIL.Image.fromarray(u8)
  np.testing.assert_array_equal(
    out[augment.OP_NAMES.index("Equalize"), 0], np.asarray(PIL.ImageOps.equalize(pil))
  )
  np.testing.assert_array_equal(
    out[augment.OP_NAMES.index("Posterize"), 0], np.asarray(PIL.ImageOps.posterize(pil, 4))
  )


def test_translate_shifts_content_and_fills_gray():
  image = _images(1, 10, 3)[0]
  matrix = augment._translate_x(image, 0.3)  # pylint: disable=protected-access
  out = augment.warp(image, matrix)  # Pulls from x + 3.
  np.testing.assert_allclose(out[:, :7], image[:, 3:], atol=1e-6)
  np.testing.assert_allclose(out[:, 7:], 0.5)


def test_normalize():
  out = augment.normalize(jnp.ones((2, 2, 2, 3)), [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
  np.testing.assert_allclose(out[0, 0, 0], [2.0, 1.0, 0.5])


def _torchvision_boxes(height, width, n, seed=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """NumPy transcription of torchvision's RandomResizedCrop.get_params (the oracle)."""
  rng = np.random.default_rng(seed)
  boxes = []
  for _ in range(n):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
      if 0 < w <= width and 0 < h <= height:
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
        break
    else:
      boxes.append((0, 0, height, width))  # The whole image: its aspect is within ratio.
  return np.asarray(boxes, np.float64)


def test_random_resized_crop_boxes_follow_torchvision():
  keys = jax.random.split(jax.random.key(0), 4000)
  box = jax.jit(jax.vmap(lambda k: augment.random_resized_crop_box(k, 32, 24)))
  top, left, h, w = (np.asarray(x) for x in box(keys))
  assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 24).all()
  assert (top >= 0).all() and (left >= 0).all()
  area = h * w / (32 * 24)
  assert area.min() >= 0.06 and area.max() <= 1.0  # 0.08 up to side rounding
  aspect = w / h
  assert aspect.min() >= 0.7 and aspect.max() <= 1.45  # 3/4 .. 4/3 up to side rounding
  oracle = _torchvision_boxes(32, 24, 4000)
  area_oracle = oracle[:, 2] * oracle[:, 3] / (32 * 24)
  assert abs(area.mean() - area_oracle.mean()) < 0.02
  assert abs(np.quantile(area, 0.9) - np.quantile(area_oracle, 0.9)) < 0.03
  # Positions are uniform over where the crop fits: centred on average.
  np.testing.assert_allclose(np.mean(top + h / 2), 16, atol=0.5)
  # Nothing fits (scale > 1): the centre crop with the aspect clamped to 4/3.
  top, left, h, w = augment.random_resized_crop_box(keys[0], 10, 40, scale=(2.0, 3.0))
  assert (int(top), int(left), int(h), int(w)) == (0, 13, 10, 13)


def test_random_resized_crop_resizes_like_pil():
  image = np.asarray(_images(1, 12, 3)[0])
  u8 = np.round(image * 255).astype(np.uint8)
  top, left, h, w = 2, 3, 5, 7
  ours = augment._resample_axis(  # pylint: disable=protected-access
    augment._resample_axis(jnp.asarray(u8 / 255.0, jnp.float32), top, h, 0), left, w, 1
  )
  pil = PIL.Image.fromarray(u8).crop((left, top, left + w, top + h))
  expected = np.asarray(pil.resize((12, 12), PIL.Image.BILINEAR)).astype(int)
  assert np.abs(np.round(np.asarray(ours) * 255).astype(int) - expected).max() <= 1
  # The whole image is reproduced exactly.
  whole = augment._resample_axis(jnp.asarray(image), 0, 12, 0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(whole, image)


def test_random_resized_crop_views_shape_range_and_determinism():
  images = (np.asarray(_images(6, 16, 3)) * 255).astype(np.uint8)
  weak = jax.jit(augment.make_preprocess("weak", mean=0.0, std=1.0, crop="random_resized_crop"))
  strong = jax.jit(augment.make_preprocess("strong", mean=0.0, std=1.0, crop="random_resized_crop"))
  a, b, c = weak(images, _keys(6)), weak(images, _keys(6)), weak(images, _keys(6, step=1))
  assert a.shape == images.shape and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # A crop of one example does not depend on the rest of the batch.
  np.testing.assert_array_equal(weak(images[2:3], _keys(6)[2:3])[0], a[2])
  s = strong(images, _keys(6))
  assert s.shape == images.shape and float(s.min()) >= 0.0 and float(s.max()) <= 1.0
  with pytest.raises(ValueError, match="Unknown crop"):
    augment.make_preprocess("weak", mean=0.0, std=1.0, crop="center")
