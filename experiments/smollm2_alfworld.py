"""A real pretrained student on ALFWorld: SmolLM2-135M-Instruct, before and after training.

    python experiments/smollm2_alfworld.py --workdir runs/smollm2 --stage baseline
    python experiments/smollm2_alfworld.py --workdir runs/smollm2 --stage compare \\
        --methods atod,opd,grpo --seeds 0,1,2
    # on an accelerator, the paper's precision and sizes:
    python experiments/smollm2_alfworld.py --workdir runs/smollm2 --stage compare \\
        --config.student.model.dtype=bfloat16 --config.teacher.model.dtype=bfloat16 \\
        --config.rollout.tasks_per_step=8 --config.rollout.group_size=8 --config.env.max_turns=50

Stages (``configs/alfworld_smollm2.py`` and its overrides):
- ``baseline``: the config's student (the untrained model; or a trained one:
  ``--config.student.init=hf --config.student.path=<run>/student_hf``) on ``--episodes``
  games of each report split at the
  validation temperature: success, the share of turns whose answer holds no
  ``<action>`` (format errors), the share of invalid turns (format errors and commands
  the game does not admit), answer length; and a few of its answers. Writes
  ``<workdir>/baseline.json``.
- ``step``: one ATOD step of the config, timed (rollout / teacher scoring / update).
- ``compare``: the methods x seeds with one teacher (built once from the same model by
  behaviour cloning, cached in ``<workdir>/teacher``) and the same evaluation episodes
  (``atod_jax.train.compare``): ``<workdir>/comparison.md``.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", "configs/alfworld_smollm2.py", "base config")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the runs and tables go")
_STAGE = flags.DEFINE_enum("stage", "baseline", ["baseline", "step", "compare"], "what to run")
_EPISODES = flags.DEFINE_integer("episodes", 16, "baseline: games per report split")
_METHODS = flags.DEFINE_string("methods", "atod,opd,grpo", "compare: methods")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "compare: seeds")
flags.mark_flag_as_required("workdir")


def baseline(config, workdir: str) -> None:
  from atod_jax.envs.prompts import extract_action
  from atod_jax.models import checkpoint as model_io
  from atod_jax.models.gguf import smollm2_path
  from atod_jax.rollout.host import host_rollout
  from atod_jax.sampling.generate import SamplingParams
  from atod_jax.train.sources import make_source
  s = config.student
  graphdef, params, cfg = model_io.load(s.init, s.path, s.model.to_dict())
  source = make_source(config, workdir, None)
  rows = []
  splits = list(config.eval.report_splits) or [config.env.eval_split]
  for split in splits:
    t0 = time.perf_counter()
    out = source.evaluate(graphdef, params, episodes=_EPISODES.value,
                          temperature=config.eval.temperature, seed=config.eval.seed,
                          split=split)
    rows.append((split, out, time.perf_counter() - t0))
  # a few answers, as the model writes them
  from flax import nnx
  traj, _ = host_rollout(nnx.merge(graphdef, params), source.codec, source.pool,
                         splits[0], [0, 1], jax.random.key(0),
                         sampling=SamplingParams(temperature=config.eval.temperature))
  samples = []
  tokens, gen = np.asarray(traj.tokens), np.asarray(traj.gen_mask)
  for b in range(tokens.shape[0]):
    answer = source.tokenizer.decode(tokens[b, 0][gen[b, 0]])
    samples.append({"answer": answer, "parsed": extract_action(answer)._asdict()})
  source.close()
  result = {"model": os.path.basename(s.path), "params": cfg.num_params(),
            "temperature": config.eval.temperature, "response_len": config.env.response_len,
            "max_turns": config.env.max_turns,
            "splits": {split: dict(out, seconds=sec) for split, out, sec in rows},
            "samples": samples}
  with open(os.path.join(workdir, "baseline.json"), "w") as f:
    json.dump(result, f, indent=1)
  trained = "untrained" if s.path == smollm2_path() else s.path
  print(f"{result['model']} ({cfg.num_params() / 1e6:.1f}M), {trained}, T="
        f"{config.eval.temperature}, answers of at most {config.env.response_len} tokens, "
        f"{config.env.max_turns} turns:\n")
  print("| split | episodes | success | format errors (share of turns) | invalid turns | "
        "answer tokens / episode | turns | seconds |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for split, out, sec in rows:
    print(f"| {split} | {_EPISODES.value} | {out['success']:.3f} | "
          f"{out['format_error_rate']:.3f} | {out['invalid_rate']:.3f} | "
          f"{out['response_tokens']:.0f} | {out['turns']:.1f} | {sec:.0f} |")
  for sample in samples:
    print(f"\nanswer: {sample['answer'][:300]!r}\nparsed: {sample['parsed']}")


def step(config, workdir: str) -> None:
  from atod_jax.train.loop import train
  config.train.update(steps=1, eval_every=1, checkpoint_every=1)
  config.eval.update(episodes=1, select_split="", report_splits=())
  train(config, workdir, quiet=False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rec = [json.loads(line) for line in f if '"train"' in line][-1]
  print("\n| part | seconds |\n|---|---:|")
  for part in ("rollout", "score", "update"):
    print(f"| {part} | {rec[f'seconds/{part}']:.1f} |")
  print(f"| whole step | {rec['step_seconds']:.1f} |")
  print(f"\n{rec['response_tokens']:.0f} answer tokens an episode, {rec['turns']:.1f} turns, "
        f"{rec['tokens_per_s']:.1f} sampled tokens/s over the step")


def compare(config, workdir: str) -> None:
  from atod_jax.train.compare import comparison_table, run_methods
  methods, seeds = _METHODS.value.split(","), [int(s) for s in _SEEDS.value.split(",")]
  results = run_methods(config, workdir, methods, seeds, say=lambda m: print(m, flush=True))
  table = comparison_table(results, methods[0], lambda r: r["final"]["eval/success"],
                           "final success (valid_seen)")
  extra = ["", "| method | success at step 0 | final format errors | final invalid turns |",
           "|---|---:|---:|---:|"]
  for m in methods:
    rs = results[m]
    extra.append(f"| {m} | {np.mean([r['step0']['eval/success'] for r in rs]):.3f} | "
                 f"{np.mean([r['final'].get('eval/format_error_rate', np.nan) for r in rs]):.3f}"
                 f" | {np.mean([r['final']['eval/invalid_rate'] for r in rs]):.3f} |")
  teacher = results[methods[0]][0]["teacher"]
  extra.append(f"| teacher | {teacher['eval/success']:.3f} | "
               f"{teacher.get('eval/format_error_rate', float('nan')):.3f} | "
               f"{teacher['eval/invalid_rate']:.3f} |")
  text = table + "\n" + "\n".join(extra)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(text + "\n")
  print(text)


def main(argv):
  del argv
  use_compilation_cache()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  config = _CONFIG.value
  {"baseline": baseline, "step": step, "compare": compare}[_STAGE.value](
      config, workdir if _STAGE.value != "step" else os.path.join(workdir, "step"))


if __name__ == "__main__":
  app.run(main)
