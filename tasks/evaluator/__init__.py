"""Train evaluator (the stage `train_evaluator`): train the yardstick classifier on the
real clean train split.

  stage.py  `run_stage(params)` (what tasks/stages.py runs) and `run_train_evaluator(cfg)`

The network itself, its training loop and `load_evaluator` are tasks/shared/evaluator.py:
train and validate read the evaluator back, and validate trains its utility classifiers
with the same loop.
"""
