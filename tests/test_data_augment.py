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
