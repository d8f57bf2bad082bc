"""The built tokenizer's order of work in a multi-process run: process 0 writes it only
after every process has looked for it (training it takes no collective, so a process
that looked later would find the new stamp, skip the barrier that follows the build and
leave process 0 waiting there: seen on a loaded 2-core machine in the 2-process test)."""
import os

from atod_jax.train import defaults as d
from atod_jax.train import distributed
from atod_jax.train.sources import make_source
from atod_jax.train.sources.text import tokenizer_dir


def test_tokenizer_stamp_is_written_only_after_every_process_looked(tmp_path, monkeypatch):
  config = d.tiny_text_run("household_text", vocab=256, max_turns=4, train_split="train",
                           eval_split="heldout")
  config.env.tokenizer_episodes = 4
  config.teacher.cache_dir = str(tmp_path / "teacher")
  stamp = os.path.join(tokenizer_dir(config, str(tmp_path)), "fingerprint.json")
  barriers = []  # (name, whether the stamp was there when this process reached it)
  monkeypatch.setattr(distributed, "sync", lambda name: barriers.append((name, os.path.exists(stamp))))
  for _ in range(2):  # a fresh build, then the cached one
    make_source(config, str(tmp_path), None, say=lambda m: None).close()
  assert barriers == [("tokenizer looked for", False), ("tokenizer trained", True),
                      ("tokenizer looked for", True)]
