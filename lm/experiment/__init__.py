"""L4, the composition root: the task registry, the run config, building a run and loading a trained one.

  registry  the one place that maps `config.head` to a task (`TASKS`)
  config    base_config() composed from every package's part; validate, load_config, config_from_saved
  splits    the run's data splits (data.source, labels for tasks that read them, cleaning)
  model     the tokenizer and model config a run resolves (its workdir, init_from, hf:DIR)
  build     build_experiment: task + mesh + jitted steps + checkpoint checks, writing nothing
  runs      initial_state (resume / warm-start / init-from) and load_trained (the latest checkpoint)
"""

from lm.experiment.build import Experiment, build_experiment, check_checkpoint_fits, token_windows, train_dataset
from lm.experiment.model import TOKENIZER_DIR, model_config_for, resolve_tokenizer, tokenizer_identity
from lm.experiment.runs import initial_state, load_trained, quantize_trained
from lm.experiment.splits import cleaned_documents, open_eval_split, open_train_split

__all__ = ["TOKENIZER_DIR", "Experiment", "build_experiment", "check_checkpoint_fits", "cleaned_documents",
           "initial_state", "load_trained", "model_config_for", "open_eval_split", "open_train_split", "quantize_trained",
           "resolve_tokenizer", "token_windows", "tokenizer_identity", "train_dataset"]
