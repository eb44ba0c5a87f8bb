"""Byte-level Shakespeare: the pretrained model that experiments/online_shakespeare.py continues.

The baseline baby GPT of experiments/shakespeare_char.py (4 layers, 4 heads,
width 128, context 64, batch 12, AdamW, cosine 1e-3 -> 1e-4, untied output)
on UTF-8 bytes instead of characters, so that any text streamed later (SST-2
sentences, other languages) is representable: the byte tokenizer has no
unknown id. TFDS `tiny_shakespeare` is ASCII, so one byte is one character and
losses compare with the character baseline's.

Expected result: eval/loss 1.874 on the TFDS validation split at step 2000
(measured; bytes = characters here, and the character baseline reaches 1.857).
Runtime: about 1.5 minutes on a 2-core CPU.

Command:
  TFDS_DATA_DIR=../shared/tfds python -m lm.main \
      --config experiments/shakespeare_byte.py --workdir runs/shakespeare_byte
"""

import importlib.util
import os


def _char_baseline():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char.py")
  spec = importlib.util.spec_from_file_location("shakespeare_char", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _char_baseline()
  config.data.tokenizer = "byte"
  return config
