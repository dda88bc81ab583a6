"""Planning a training run without a GPU: `lift-fast plan` (planner.py), the peak memory of one step
measured on fake tensors (memory.py) under CUDA's autocast rules (autocast_rules.py), and the
activation-checkpointing policy `model.grad_checkpointing=auto` resolves to (choose.py `choose_checkpointing`)."""

from lift_fast.plan.memory import StepMemory, measure_step
from lift_fast.plan.planner import GPUS, Device, device_for, format_plan, make_plan, run_plan

__all__ = ["GPUS", "Device", "StepMemory", "device_for", "format_plan", "make_plan", "measure_step", "run_plan"]
