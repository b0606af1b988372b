"""`snakemake --executor submitit`: see varkd.executor."""
from varkd.executor import Executor, ExecutorSettings, common_settings

__all__ = ["Executor", "ExecutorSettings", "common_settings"]
