"""Statistics of evaluation results: numpy/scipy functions of arrays and texts, no model, no JAX.

  bootstrap   the paired bootstrap (one resampler), the mean-difference test
  ab          A/B comparisons of two models (language models, classifiers) and the online promotion gate
  classify    classification metrics, confusion matrices, stratified folds, McNemar's test
  continual   the continual-learning matrix R (average loss, forgetting, backward/forward transfer)
  generation  BLEU / self-BLEU quality-diversity points and curves (sacrebleu)
"""
