"""Every pipeline of lars-fx, each one list of passes (values: a pass names itself and checks its
preconditions in ``requires``; passes share only the graph, see ``fx_spec``).

``LARS_SGD``: a captured ``torch.optim.SGD`` step rewritten into LARS (``LARS(fused=True)`` and the
``lars_fx`` backend run it). Its three LARS subgraphs are the passes ``insert_lars_norms`` (norm),
``insert_trust_ratio`` (trust ratio) and ``rewrite_momentum`` (momentum); ``reduce_sharded_norms`` and
``carry_weight_norms`` act only when the request asks for them.

``LAMB_ADAM``: a captured ``torch.optim.Adam``/``AdamW`` step rewritten into LAMB (``LAMB(fused=True)``): its
own matcher and update pass around the same norm, sharded-reduce, trust-ratio and carry passes.

``LARS_JOINT``: a joint forward-backward graph (loss and gradients) given LARS over momentum SGD, so that it
returns the stepped parameters and momentum buffers (``lars_fx.executorch``'s ``train_step``): its own matcher
and momentum pass around the same norm and trust-ratio passes.

``INDUCTOR_POST_GRAD``: passes Inductor runs on its post-grad graph (``fx_pipeline.compile_with_inductor``).

``FxPass`` and ``InductorPass`` are what ``fx_pipeline`` reads of the two kinds: a ``torch.fx`` ``PassBase``
or an Inductor ``CustomGraphPass``, each with the ``name`` that stages, dumps and ``LARS_FX_DISABLE`` use.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from .fx_carry_weight_norms import CarryWeightNorms
from .fx_joint_momentum import AppendMomentumStep
from .fx_lamb_update import RewriteLambUpdate
from .fx_match_adam import MatchAdamUpdate
from .fx_match_joint import MatchJointGradients
from .fx_match_sgd import MatchSgdUpdate
from .fx_momentum import RewriteMomentum
from .fx_norm_after_write_back import NormAfterWriteBack
from .fx_norms import InsertLarsNorms
from .fx_reduce_sharded_norms import ReduceShardedNorms
from .fx_trust_ratio import InsertTrustRatio

__all__ = [
    "FxPass", "InductorPass", "Pipeline", "LARS_SGD", "LAMB_ADAM", "LARS_JOINT", "INDUCTOR_POST_GRAD",
    "PIPELINES",
]


class FxPass(Protocol):
    """A pass of a pipeline: a ``torch.fx.passes.infra.pass_base.PassBase`` with a ``name``."""

    name: str

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult | None: ...


class InductorPass(Protocol):
    """A pass Inductor runs on its post-grad graph: a ``CustomGraphPass`` with a ``name``."""

    name: str

    def __call__(self, graph: torch.fx.Graph) -> None: ...

    def uuid(self) -> Any: ...


Pipeline = tuple[FxPass, ...]

LARS_SGD: Pipeline = (
    MatchSgdUpdate(),
    InsertLarsNorms(),
    ReduceShardedNorms(),
    InsertTrustRatio(),
    RewriteMomentum(),
    CarryWeightNorms(),
)

# A captured torch.optim.Adam/AdamW step rewritten into LAMB: the norm, sharded-reduce, trust-ratio and carry
# passes are LARS's, the trust ratio named by the LambRequest.
LAMB_ADAM: Pipeline = (
    MatchAdamUpdate(),
    InsertLarsNorms(),
    ReduceShardedNorms(),
    InsertTrustRatio(),
    RewriteLambUpdate(),
    CarryWeightNorms(),
)

# A joint forward-backward graph (a training program's) given LARS over momentum SGD: the norm and trust-ratio
# passes are LARS_SGD's.
LARS_JOINT: Pipeline = (
    MatchJointGradients(),
    InsertLarsNorms(),
    InsertTrustRatio(),
    AppendMomentumStep(),
)

INDUCTOR_POST_GRAD: tuple[InductorPass, ...] = (NormAfterWriteBack(),)

PIPELINES: dict[str, Pipeline] = {"lars_sgd": LARS_SGD, "lamb_adam": LAMB_ADAM, "lars_joint": LARS_JOINT}
