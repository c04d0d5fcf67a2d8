"""EditStrategy: Lightning's DDP processes without the DistributedDataParallel wrapper.

Editing has no gradients to average (the LM is frozen; z is optimised inside a step by the method
itself), and DDP refuses a module with no trainable parameter. What editlab needs from DDP is the
process launch, torch.distributed set up (gloo on CPU, nccl on GPUs), one model replica per rank
and every rank seeing the same edit batches: the methods share a step's per-request work across
ranks themselves (editlab.distributed). The CLI picks this strategy whenever more than one device
is asked for.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class EditStrategy(DDPStrategy):
    strategy_name = "editlab"

    def configure_ddp(self) -> None:
        # Keep the LightningModule itself: nothing to wrap, no gradient hooks to register.
        pass
