"""A built teacher that starts from a pretrained model (teacher.build.init) rather than
a fresh one: it keeps that model's shape and starts from its weights."""
import jax
import numpy as np
from flax import nnx

from atod_jax.models import DecoderLM, ModelConfig, save_pretrained
from atod_jax.models import checkpoint as model_io
from atod_jax.train import validate
from atod_jax.train.sources import make_source
from atod_jax.train.teacher import get_teacher
from tests.train import tiny_config


def test_teacher_built_from_a_pretrained_start(tmp_path):
  config = tiny_config.get_config()
  fresh_shape = ModelConfig(**config.teacher.model)
  start_cfg = fresh_shape.replace(num_layers=3, dtype="float32")  # not the fresh shape
  start = DecoderLM(start_cfg, nnx.Rngs(7))
  save_pretrained(start, tmp_path / "start")
  config.teacher.build.update(init="hf", init_path=str(tmp_path / "start"), select_every=0)
  config.teacher.model = {"dtype": "float32"}  # overrides of the start's config
  validate(config)
  source = make_source(config, str(tmp_path / "run"), None)
  try:
    graphdef, params, cfg, info = get_teacher(config, source, str(tmp_path / "run"),
                                              say=lambda m: None)
  finally:
    source.close()
  assert cfg.num_layers == 3 and cfg.hidden_size == start_cfg.hidden_size
  # trained from the start's weights: close to them after 3 small steps, not a new draw
  start_params = nnx.state(start)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, start_params)
  assert 0 < max(jax.tree.leaves(moved)) < 0.1
  # cached: a second call loads the same parameters
  again = model_io.load("checkpoint", info["dir"])[1]
  jax.tree.map(np.testing.assert_array_equal, again, params)
