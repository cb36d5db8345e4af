"""`lowmem-sdpo eval`: a finished run's models M_t on preference data (preference.py) and on
lm-evaluation-harness tasks (harness.py); runmodels.py loads them the way the run trained them."""
