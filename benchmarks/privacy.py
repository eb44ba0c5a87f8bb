r"""Privacy-utility of DP-SGD: SST-2 at several epsilons and without privacy, the Shakespeare LM at epsilon 8.

  python benchmarks/privacy.py [--root /tmp/privacy] [--sst2 1,3,8,none] [--lm 8,none]

Runs `experiments/sst2_private.py:EPS` and `experiments/shakespeare_char_private.py:EPS` one after another
(`python -m lm.main`, a fresh workdir each), then prints a Markdown table (epsilon reached, noise multiplier,
dev and test accuracy of the best-on-dev weights or eval loss, training time) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def run(config: str, workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "lm.main", "--config", config, "--workdir", workdir], cwd=ROOT,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    sys.exit(f"error: {config} failed:\n{done.stderr[-3000:]}")
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  rows = _rows(workdir)
  final = {key: value for row in rows for key, value in row.items() if key.startswith("final")}
  evals = [row for row in rows if "eval/loss" in row]
  return {"config": config, "seconds": round(seconds, 1), **summary, **final,
          "eval_curve": [{k: row.get(k) for k in ("step", "eval/loss", "eval/accuracy", "privacy/epsilon")}
                         for row in evals]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="/tmp/privacy", help="workdirs go under it (replaced)")
  parser.add_argument("--sst2", default="1,3,8,none", help="epsilons of the SST-2 runs ('none': no privacy)")
  parser.add_argument("--lm", default="8,none", help="epsilons of the Shakespeare LM runs")
  args = parser.parse_args()
  results = []
  for name, config, variants in (("sst2", "experiments/sst2_private.py", args.sst2),
                                 ("lm", "experiments/shakespeare_char_private.py", args.lm)):
    for variant in filter(None, variants.split(",")):
      result = run(f"{config}:{variant}", os.path.join(args.root, f"{name}_{variant}"))
      results.append({"task": name, "target_epsilon": variant, **result})
      print(json.dumps(results[-1]), flush=True)
  print("\n| task | target epsilon | epsilon reached | noise multiplier | dev accuracy | test accuracy | eval loss "
        "| time |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    eps = r.get("privacy/epsilon")
    print(f"| {r['task']} | {r['target_epsilon']} | {'-' if eps is None else f'{eps:.3f}'} | "
          f"{r.get('privacy/noise_multiplier', '-')} | {r.get('final_eval/accuracy', '-')} | "
          f"{r.get('final_test/accuracy', '-')} | {r['eval/loss']:.4f} | {r['seconds']:.0f} s |")
  print(json.dumps({"runs": results}))


if __name__ == "__main__":
  main()
