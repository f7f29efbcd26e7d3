"""Starting a training job: in this process, or as workers under torchrun's elastic agent (launcher);
one worker process (worker); its process group (process_group)."""

from pstar_cli.launch.launcher import MULTI_GPU_ENV, WorkerFailed, launch

__all__ = ["MULTI_GPU_ENV", "WorkerFailed", "launch"]
