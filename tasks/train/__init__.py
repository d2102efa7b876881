"""Train: fit a class-conditional generator (train.family) to the fused dataset.

  stage.py           `run_stage(params)` (what tasks/stages.py runs): the training run
  train_eval.py      the generator's validation score while it trains (KID on real val)
  early_stopping.py  which evaluation is the best, and when to stop
  checkpoints.py     what a bit-exact resume needs
  distributed.py     the torchrun (DDP) launch and each rank's set-up

The generator families themselves are tasks/shared/generators/: generate samples them too.
"""
