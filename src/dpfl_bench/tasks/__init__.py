"""The task registry. Built-in tasks are registered by importing their modules, listed here explicitly."""

from dpfl_bench.tasks import glue, hub_vision, images, sentiment, synthetic  # noqa: F401  (registers the built-in tasks)  # noqa: F401  (registers the paper's hub tasks)
from dpfl_bench.tasks.base import TASKS, Examples, Task, TaskData, TrainTestSplit, register_task

__all__ = ["TASKS", "Examples", "Task", "TaskData", "TrainTestSplit", "register_task"]
