"""The runtime every pipeline (sdpo run, sft, eval, self-reward, toy) builds on: hardware and dtypes, data-parallel
ranks, progress reporting, failure types and exit codes, per-phase memory peaks, the CPU heap bound, the model
holders and the fused log-prob pass. It imports the foundation and the data/models/losses layers only."""
