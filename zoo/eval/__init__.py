"""Evaluation: how samples are scored (docs/evaluation.md).

  judge.py       the evaluation network of the built-in data (supervised CNN; `zoo prepare judge`)
  extractors.py  torch-fidelity feature extractors: the judge, InceptionV3, DINOv2 (local weights only)
  reference.py   the reference split and its features, cached per data and extractor
  metrics.py     FID, KID, precision/recall (torch-fidelity's formulas) and class accuracy
  evaluate.py    EvalSettings, Evaluator (sample a checkpoint, score, save the JSON record), load_samples
"""
