"""Give an ONNX Runtime training checkpoint an optimizer state (first moments) and the learning rate.

ORT 1.19's Python API cannot set optimizer state. So ORT itself writes the state (an ``Optimizer``
built on the artifacts, ``save_checkpoint(include_optimizer_state=True)``) and the moment values are
then overwritten in place in the flatbuffer, through ORT's own generated schema classes; their sizes
do not change, so the file's layout stays ORT's.

ORT 1.19's ``Optimizer`` starts at lr 0.001 whatever a checkpoint holds, so the learning rate travels as
the checkpoint property ``LR_PROPERTY``, for ``optimizer.set_learning_rate(state.properties[LR_PROPERTY])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import Checkpoint
from onnxruntime.training.api import CheckpointState, Module, Optimizer

__all__ = ["LR_PROPERTY", "write_optimizer_state"]

LR_PROPERTY = "lars_fx.learning_rate"


def write_optimizer_state(directory: Path, *, lr: float, first_moments: Mapping[str, np.ndarray]) -> None:
    """Rewrite ``directory/checkpoint`` with an optimizer state holding ``first_moments`` (zeros for the
    parameters not in it) and the property ``LR_PROPERTY = lr``."""
    path = directory / "checkpoint"
    state = CheckpointState.load_checkpoint(path)
    # The eval model too: a model ORT cannot load fails here, at export, rather than on the device.
    module = Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    Optimizer(str(directory / "optimizer_model.onnx"), module)
    state.properties[LR_PROPERTY] = float(lr)
    CheckpointState.save_checkpoint(state, path, include_optimizer_state=True)
    del module, state

    data = bytearray(path.read_bytes())
    checkpoint = Checkpoint.Checkpoint.GetRootAs(data, 0)
    if checkpoint.OptimizerGroupsLength() != 1:
        raise RuntimeError(
            f"expected one optimizer group in {path}, found {checkpoint.OptimizerGroupsLength()}"
        )
    group = checkpoint.OptimizerGroups(0)

    # Every moment is overwritten: momentum0 with the given velocity or zeros, the others (AdamW's
    # second moment, which the momentum emulation needs at zero) with zeros, whatever the source held.
    remaining = dict(first_moments)
    for index in range(group.OptimizerStatesLength()):
        param_state = group.OptimizerStates(index)
        name = param_state.ParamName().decode()
        first = remaining.pop(name, None)
        for j in range(param_state.MomentumsLength()):
            tensor = param_state.Momentums(j)
            raw = tensor.RawDataAsNumpy()
            if isinstance(raw, int):  # no inline data: ORT put the state in an external file
                raise RuntimeError(
                    f"{path} keeps optimizer state outside the file; external data is not supported"
                )
            if tensor.Name() == b"momentum0" and first is not None:
                value = np.ascontiguousarray(first, dtype=np.float32)
                if raw.nbytes != value.nbytes:
                    raise RuntimeError(
                        f"momentum0 of {name!r} holds {raw.nbytes} bytes, the velocity {value.nbytes}"
                    )
                raw[:] = np.frombuffer(value.tobytes(), dtype=np.uint8)
            else:
                raw[:] = 0
    if remaining:
        raise RuntimeError(f"the checkpoint's optimizer state has no entry for {sorted(remaining)}")
    path.write_bytes(bytes(data))
