"""What several stages use; no stage's own code. Every other package under tasks/ is one
stage (tasks/stages.py names them), and a stage imports only its own package, this one and
synthloop/ (tests/test_stage_registry.py holds the tree to that).

  images.py        image datasets as tensors: Parquet PNG rows <-> uint8 tensors
  metrics.py       FID/KID, precision/recall/density/coverage and the other figures
  evaluator.py     the evaluator classifier: trained by train_evaluator, read by train and
                   validate, and the loop that trains validate's utility classifiers
  generators/      the generator families: train fits them, generate samples them
  model_dir.py     the model directory train writes and generate reads
  expectations.py  Great Expectations checks: clean's and validate's
  feedback.py      people's feedback files and the generation requests in them
  pool.py          the accepted-synthetic pool: fuse and validate read it, the loop
                   (flows/) promotes into it
"""
