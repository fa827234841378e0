"""The policy file every vLLM engine of the test session is configured with."""

# Policies every engine of the session is configured with (default none): the observe-only engine and
# the server serve requests that select none of them, so their outputs equal plain vLLM's *with*
# interventions configured (MLP and attention wrappers installed).
POLICIES = {"default": "none", "allow_inline": False, "policies": [
    {"name": "remove", "interventions": [{"kind": "mlp_projection_removal", "alpha": 1.0}]},
    {"name": "clamp", "interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 1.0}]},
    {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.2,
                                       "layers": [3, 4, 5, 6, 7, 8, 12, 20], "heads": [0, 4, 8]}]},
    {"name": "act_decode", "interventions": [{"kind": "attention_redistribution", "beta": 0.0, "phases": ["decode"]}]},
    {"name": "zero", "interventions": [{"kind": "first_token_scaling", "gamma": 0.5, "layers": [2, 5, 9],
                                        "heads": [1, 2]}]},
]}
