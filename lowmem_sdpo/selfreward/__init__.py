"""Self-rewarding sDPO (Yuan et al. 2024, on sDPO's run directory): M_{t-1} writes candidates, a judge
scores them with an additive rubric, the highest against the lowest score is D_t, and D_t is sDPO step t.

Phases, each resumable on its own: generation.py (sampling), judge.py + scores.py (judging and parsing),
pairs.py (D_t), loop.py (the iterations and the training through lowmem_sdpo.engine).
"""
