"""Where a training run stands: one object that the callbacks update and the resume backup saves, so a
run killed and started again continues with the same counters, schedule and best epoch."""

from dataclasses import asdict, dataclass, field


@dataclass
class TrainingState:
    """Updated after every epoch by `emunet.training.callbacks`; saved by `emunet.training.checkpoint`."""

    run_id: str | None = None  # the MLflow run a resumed training logs to (the chief's)
    next_epoch: int = 0  # the first epoch not yet completed
    data_epoch: int = 0  # the loader's epoch counter: which batches the next epoch draws
    schedule_step: int = 0  # optimizer steps taken (the warm-up counts them)
    best_score: float = -1.0  # the best epoch's `champion_metric` (what decides the best epoch)
    best_dice: float = -1.0  # the best epoch's val_dice
    best_epoch: int = -1
    spent_seconds: float = 0.0  # wall time of completed epochs, all attempts: the time budget counts these
    stopped: bool = False  # training decided to stop (budget, patience) after `next_epoch - 1`
    metrics: dict = field(default_factory=dict)  # the last epoch's, re-logged if a kill came before logging
    best_weights: list | None = field(default=None, repr=False)  # arrays of the best epoch; not in the JSON

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "best_weights"}

    @classmethod
    def from_json(cls, data: dict, best_weights: list) -> "TrainingState":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**fields, "best_weights": best_weights})
