"""The carry toy: a two-digit addition task on which the tiny model's held-out generalisation is real, and the
scoring of S and trained adapter chains on its held-out pairs (issue 18's sDPO vs DPO benchmark and the demo).
The task itself (problems, splits, pairs) is data/carry_task.py: models/tiny.py warms `tiny-carry` up on it, and
the models layer sits below this package."""
