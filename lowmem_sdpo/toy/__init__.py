"""The carry toy: a two-digit addition task on which the tiny model's held-out generalisation is real, and the
scoring of S and trained adapter chains on its held-out pairs (issue 18's sDPO vs DPO benchmark and the demo)."""
