"""`train.init_from`: start a run from a trained detector's weights (fine-tuning), not from scratch.

Only the weights: the optimizer, the schedule and the epoch count start anew (continuing a run whose
driver died is `retinaops train --resume`). The file is a model file of this platform (a run's
`checkpoint/model.pt` artifact, or the `model.pt` in one of its checkpoint folders), local or s3://.
The driver checks it fits the job's model before Ray starts; each worker then loads it.
"""

from __future__ import annotations

from retinaops.job.paths import SpecError
from retinaops.s3data import materialize

FIELD = "train.init_from"


def init_state(job):
    """The weights (a state dict) `train.init_from` names, or None when it is not set; a file that is
    missing or not a model file is a SpecError naming it."""
    from retinanet.checkpoint import read_checkpoint

    uri = job.train.init_from
    if uri is None:
        return None
    try:
        return read_checkpoint(materialize(uri, job.where.data_cache, job.where.storage_endpoint))[
            "state_dict"
        ]
    except (OSError, ValueError) as exc:
        raise SpecError(job.spec.source, [f"{FIELD}: {uri}: {exc}"]) from exc


def load_init_weights(model, job) -> bool:
    """Load `train.init_from`'s weights into model (a RetinaNet of job.model); False when it is not set.
    Weights that do not fit the model (other classes, anchors per place, backbone) are a SpecError."""
    from retinanet.checkpoint import load_state_dict_checked

    state = init_state(job)
    if state is None:
        return False
    try:
        load_state_dict_checked(model, state, "its weights do not fit this job's model")
    except ValueError as exc:
        raise SpecError(job.spec.source, [f"{FIELD}: {job.train.init_from}: {exc}"]) from exc
    return True


def check_init_from(job) -> None:
    """On the driver, before Ray starts: the weights load into the job's model (see load_init_weights)."""
    from retinanet import RetinaNet

    if job.train.init_from is not None:
        load_init_weights(RetinaNet(job.model, read_backbone_weights=False), job)
