"""Validate: is the synthetic data faithful, diverse, not a copy, and does it help?

stage.py             the sharded stage: `SHARDING` (what
                     tasks/stages.py runs): gather the rows and features, write the report
features.py          the sharded pass: evaluator features of the real splits and the
                     synthetic rows
figures.py           the figure groups: fidelity, utility, privacy
gates.py             the verdicts: which rows are accepted, which gates the round passes
promotion.py         what promoting the accepted rows would deliver: the utility arm
utility_protocol.py  the utility protocol: the arms, their trainings, how they compare
utility_trainer.py   the downstream classifier of every arm, and its worker processes
online_augment.py    the augment policy on the fly, for the utility classifiers
privacy.py           does the generator give its training images away?
inception.py         standard (Inception) FID from local weights, reported, not gated
"""
