"""Validate: is the synthetic data faithful, diverse, not a copy, and does it help?

stage.py             the sharded stage: `SHARDING`, `run_stage(params)` (what
                     tasks/stages.py runs), the gates and which rows the pool accepts
features.py          the sharded pass: evaluator features of the real splits and the
                     synthetic rows
inception.py         standard (Inception) FID from local weights, reported, not gated
privacy.py           does the generator give its training images away?
utility_protocol.py  the utility protocol: the arms, their trainings, how they compare
utility_trainer.py   the downstream classifier of every arm, and its worker processes
online_augment.py    the augment policy on the fly, for the utility classifiers
"""
