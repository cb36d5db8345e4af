"""The parts of benchmarks/bench_e2e.py (its docstring says what it measures and how):

settings.py   systems, shapes, the settings every system shares
clock.py      the phase clock: wall, CPU time and peak memory of nested phases, sampled every 5 ms
fixtures.py   each shape's model and data, and their token counts (the "prepare" worker)
preimport.py  imports done before any clock starts
ours.py       the ours systems: run_sdpo, phases from the engine's phase events
trl_system.py the TRL systems: DPOTrainer on the same model and data
worker.py     one worker process: a system under the clock, its result JSON
spawn.py      starting worker processes
report.py     rows, medians, the table and the result JSON
driver.py     the parent's loop over shapes, systems and repeats
"""
