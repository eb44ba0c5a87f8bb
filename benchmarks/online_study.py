r"""Online learning study: replay 0 / 10 / 25 %, with and without re-warming, and a union retrain.

  python benchmarks/online_study.py [--out runs/online_study] [--pretrained runs/shakespeare_byte]

1. Pretrains experiments/shakespeare_byte.py into --pretrained (if it holds no checkpoint).
2. Runs experiments/online_shakespeare.py (5 SST-2 chunks x 300 steps) for each
   replay fraction and learning-rate schedule, in fresh workdirs under --out.
3. "Union retrain": trains the same model from scratch for the same total
   number of steps (pretraining + online) on everything the online runs saw
   (tiny_shakespeare train + the SST-2 sentences they trained on), then
   evaluates it on the same held-out sets.
Prints a Markdown table: tiny_shakespeare forgetting (final - best loss) and
final losses on both domains, each relative to naive fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ONLINE = "experiments/online_shakespeare.py"
PRETRAIN = "experiments/shakespeare_byte.py"
RUNS = {  # name: (replay_fraction, lr_schedule)
    "naive (replay 0 %)": (0.0, "rewarm"),
    "replay 10 %": (0.1, "rewarm"),
    "replay 25 %": (0.25, "rewarm"),
    "naive, constant lr": (0.0, "constant"),
    "replay 10 %, constant lr": (0.1, "constant"),
    "replay 25 %, constant lr": (0.25, "constant"),
}


def lm_main(*args: str) -> None:
  subprocess.run([sys.executable, "-m", "lm.main", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def online_run(out: Path, name: str, pretrained: Path, replay: float, schedule: str) -> dict:
  workdir = out / slug(name)
  if not (workdir / "continual.json").exists():
    lm_main("--config", ONLINE, "--workdir", str(workdir), "--mode", "online",
            f"--config.online.init_from={pretrained}", f"--config.online.replay_fraction={replay}",
            f"--config.online.lr_schedule={schedule}")
  return json.loads((workdir / "continual.json").read_text())


def trained_sst2_documents(config) -> list[str]:
  """The SST-2 sentences the online runs trained on: the stream, cleaned and split exactly as the loop does."""
  from lm.data import clean as clean_lib, stream as stream_lib  # pylint: disable=g-import-not-at-top
  from lm.online.run_state import is_heldout  # pylint: disable=g-import-not-at-top
  online = config.online
  stream = stream_lib.parse_stream(online.stream, num_chunks=int(online.chunks), domain=online.domain or None,
                                   split=online.split, text_field=config.data.text_field)
  cleaner = clean_lib.Cleaner(clean_lib.CleanConfig.from_mapping(config.clean.to_dict()))
  consumed, documents = [], []
  while (chunk := stream.next_chunk(consumed)) is not None:
    kept, _ = cleaner.clean(chunk.documents)
    documents += [doc for doc in kept if not is_heldout(doc, float(online.heldout_fraction))]
    consumed.append(chunk.id)
  return documents


def union_retrain(out: Path, reference_run: Path, total_steps: int) -> dict[str, float]:
  """Trains from scratch on the union of the data and evaluates on the online runs' held-out sets."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.data import sources  # pylint: disable=g-import-not-at-top
  from lm.online.step import make_sequence_losses  # pylint: disable=g-import-not-at-top
  from lm.experiment import load_trained# pylint: disable=g-import-not-at-top
  from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  config = load_config(str(ROOT / ONLINE))
  corpus = out / "union_corpus"
  workdir = out / "union_retrain"
  if not checkpoint_lib.has_checkpoint(str(workdir)):
    corpus.mkdir(parents=True, exist_ok=True)
    shakespeare = list(sources.open_split("tfds:tiny_shakespeare", "train"))
    sst2 = trained_sst2_documents(config)
    (corpus / "train.txt").write_text("\n\n".join(shakespeare + sst2) + "\n")
    (corpus / "validation.txt").write_text("\n\n".join(sources.open_split("tfds:tiny_shakespeare", "validation")))
    lm_main("--config", PRETRAIN, "--workdir", str(workdir), f"--config.data.source={corpus}",
            f"--config.steps={total_steps}", "--config.eval_every=500", "--config.checkpoint_every=500")
  union_config = load_config(str(ROOT / PRETRAIN), {"data.source": str(corpus), "steps": total_steps})
  experiment, params, _ = load_trained(union_config, str(workdir), "eval")
  heldout = _heldout_of(reference_run)
  losses = jax.jit(make_sequence_losses(experiment.model))
  result = {}
  with experiment.steps.context():
    for domain, windows in heldout.items():
      per_sequence = [np.asarray(losses(params, {"inputs": windows[i:i + 32, :-1], "targets": windows[i:i + 32, 1:]}))
                      for i in range(0, len(windows), 32)]
      result[domain] = float(np.mean(np.concatenate(per_sequence)))
  return result


def _heldout_of(run: Path) -> dict[str, np.ndarray]:
  """The held-out windows an online run evaluated on (from its latest checkpoint)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from lm.online.store import unpack_arrays  # pylint: disable=g-import-not-at-top
  from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  step = checkpoint_lib.latest_step(str(run))
  restored = ocp.StandardCheckpointer().restore(str(run / "checkpoints" / str(step) / "arrays"))
  arrays = unpack_arrays(restored["npz"])
  names = json.loads(arrays["heldout/domains"].tobytes().decode())
  return {name: arrays[f"heldout/{index}"] for index, name in enumerate(names)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/online_study")
  parser.add_argument("--pretrained", default="runs/shakespeare_byte")
  args = parser.parse_args()
  os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
  out, pretrained = (ROOT / args.out).resolve(), (ROOT / args.pretrained).resolve()
  from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  if not checkpoint_lib.has_checkpoint(str(pretrained)):
    lm_main("--config", PRETRAIN, "--workdir", str(pretrained))
  results = {name: online_run(out, name, pretrained, *settings) for name, settings in RUNS.items()}
  naive = results["naive (replay 0 %)"]
  domains = naive["domains"]
  old, new = domains[0], domains[1]
  print(f"| run | {old} forgetting | vs naive | {old} final loss | {new} final loss | {new} vs naive |")
  print("|---|---|---|---|---|---|")
  for name, result in results.items():
    forgetting = result["per_domain"][old]["forgetting"]
    final_new = result["per_domain"][new]["final"]
    print(f"| {name} | {forgetting:.4f} | {forgetting / naive['per_domain'][old]['forgetting']:.2f}x | "
          f"{result['per_domain'][old]['final']:.4f} | {final_new:.4f} | "
          f"{final_new / naive['per_domain'][new]['final'] - 1:+.1%} |")
  total_steps = 2000 + 5 * 300
  union = union_retrain(out, out / slug("replay 25 %"), total_steps)
  print(f"| union retrain ({total_steps} steps from scratch) | n/a | | {union[old]:.4f} | {union[new]:.4f} | "
        f"{union[new] / naive['per_domain'][new]['final'] - 1:+.1%} |")
  print()
  print(json.dumps({name: {k: r[k] for k in ("avg_loss", "forgetting", "bwt", "fwt")} for name, r in results.items()},
                   indent=1))


if __name__ == "__main__":
  main()
