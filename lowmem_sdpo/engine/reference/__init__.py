"""The reference pass: M_{t-1}'s log-probs on D_t, cached on disk under a key of everything they depend on
(`logps`), and the held-out pairs' figures during and after training (`heldout`)."""
