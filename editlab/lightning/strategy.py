"""EditStrategy: Lightning's DDP processes without the DistributedDataParallel wrapper.

Editing has no gradients to average (the LM is frozen; z is optimised inside a step by the method
itself), and DDP refuses a module with no trainable parameter. What editlab needs from DDP is the
process launch, torch.distributed set up (gloo on CPU, nccl on GPUs), one model replica per rank
and every rank seeing the same edit batches: the methods share a step's per-request work across
ranks themselves (editlab.distributed). The CLI picks this strategy whenever more than one device
is asked for.

Evaluation is rank 0's alone: while it evaluates (the unedited model before the first step, a
periodic point, the final evaluation) the other ranks wait in the next collective. Lightning's
default process-group timeout (30 minutes) would end a run whose evaluation takes longer (a
20,000-case stream with the full probe sets), so this strategy waits EVALUATION_WAIT unless a
timeout is given (``--trainer.strategy editlab.lightning.strategy.EditStrategy
--trainer.strategy.timeout 2:00:00``).
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy

EVALUATION_WAIT = timedelta(hours=12)


class EditStrategy(DDPStrategy):
    strategy_name = "editlab"

    def configure_ddp(self) -> None:
        # Keep the LightningModule itself: nothing to wrap, no gradient hooks to register.
        pass

    def setup_distributed(self) -> None:
        # Lightning's default (None counts as it) becomes EVALUATION_WAIT; a timeout the user set is kept.
        if self._timeout is None or self._timeout == default_pg_timeout:
            self._timeout = EVALUATION_WAIT
        super().setup_distributed()
