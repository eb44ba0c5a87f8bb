"""Distillation: the baseline's 2-layer student trained on its 4-layer teacher's soft targets (`lm.tasks.distill`).

Teacher: a finished run of experiments/shakespeare_char.py (4 layers, width
128; `make train` writes it to runs/shakespeare_char, the default of
distill.teacher here). Student: the same config with 2 layers, the same
2,000 steps, batch, seed and data order as experiments/shakespeare_char_2layer.py
(the student trained alone) and the same initial weights. Loss per target
token: (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), here
T = 2, alpha = 0.5. eval/loss is the student's own language-model loss, the
figure to compare with the student trained alone.

Expected result (measured; BENCHMARKS.md "Distillation: a 2-layer student of
the baseline (2-core CPU)", every run made): eval/loss 1.814 at step 2000
(best 1.810 at step 1750), against 1.860 for the same student trained alone
and 1.857 for the teacher; with distill.temperature=1: 1.806 (1.779 at seed 0,
where the student alone reaches 1.832); with distill.alpha=0: 1.860, the
student alone's, bit for bit.
Runtime: 4 min 40 s on a 2-core CPU shared with other jobs (57 % of it), about
1.5x the student alone's (the teacher's forward pass in every step); the
teacher's own run took 6 min 12 s there.

Command:
  # the teacher first (or name any run of experiments/shakespeare_char.py), then the student
  TFDS_DATA_DIR=../shared/tfds python -m lm.main \
      --config experiments/shakespeare_char.py --workdir runs/shakespeare_char
  TFDS_DATA_DIR=../shared/tfds python -m lm.main \
      --config experiments/distill_shakespeare.py --workdir runs/distill_shakespeare \
      --config.distill.teacher=runs/shakespeare_char
"""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _student():
  spec = importlib.util.spec_from_file_location("shakespeare_char_2layer",
                                                os.path.join(_HERE, "shakespeare_char_2layer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _student()
  config.head = "distill"
  config.distill.teacher = "runs/shakespeare_char"  # a workdir of experiments/shakespeare_char.py, or hf:DIR
  config.distill.temperature = 2.0
  config.distill.alpha = 0.5
  return config
