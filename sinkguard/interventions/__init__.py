"""Interventions: the spec registry, the policy model, and the engine-independent math of each edit
(attention-mass redistribution, MLP output edits) that both engine adapters apply."""
