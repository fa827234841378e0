"""Where sinkguard's per-layer work sits in a compiled vLLM model, decided from the configured policies
before the model is traced (see ``layer_op.py``):

In both, the detector's statistics are computed inside the compiled graph and copied into
persistent buffers; no Python runs inside the model for detection.

- ``in_graph``: nothing more. Observe-only servers, and servers whose policies only scale
  first-token attention.
- ``layer_op``: the opaque edit op calls Python on every decoder layer's MLP output, because a
  configured policy decides per step there: MLP edits (which rows, which formation), attention
  redistribution (it tracks each request's newly formed sinks at the forming layers), or
  ``allow_inline`` (a request may send either).

Attention edits of any kind also run Python inside the model (a wrapper around the attention
implementation, which vLLM calls from its attention op), so full CUDA graphs, which replay kernels
only, are refused when any policy edits (:func:`python_in_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from sinkguard.interventions.policy import Policy, PolicySet
from sinkguard.interventions.specs import AttentionRedistribution

Placement = Literal["in_graph", "layer_op"]
INLINE = "allow_inline (a request may send any intervention)"


def _named(policies: PolicySet, needs: Callable[[Policy], bool]) -> list[str]:
    """The policies that ``needs`` picks, and ``allow_inline`` (a request may send anything)."""
    names = [p.name for p in policies.policies if needs(p)]
    return [*names, INLINE] if policies.allow_inline else names


def layer_op_policies(policies: PolicySet) -> list[str]:
    """The policies (and ``allow_inline``) that need the layer op."""
    return _named(policies, lambda p: any(s.family == "mlp" or isinstance(s, AttentionRedistribution)
                                          for s in p.interventions))


def python_in_model(policies: PolicySet) -> list[str]:
    """The policies (and ``allow_inline``) whose work runs Python inside the model's forward."""
    return _named(policies, lambda p: bool(p.interventions))


def placement(policies: PolicySet) -> Placement:
    return "layer_op" if layer_op_policies(policies) else "in_graph"
