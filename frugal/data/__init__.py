"""Data: named tasks loaded as uint8 TaskData, fetched and verified into a local cache.

    load_task("mnist")              -> TaskData (train 55000 / val 5000 / test 10000)
    load_corrupted("mnist")         -> {"gaussian_noise-s1": Split, ...}
    fetch("cluttered-mnist-60")     -> the cache folder, generated on first call
    list_datasets(), format_dataset_table(...)  for `frugal data list`

The cache lives in data_root(): $FRUGAL_DATA, else $XDG_CACHE_HOME/frugal or ~/.cache/frugal.
Array files are read bounded and never unpickled (bounded.py, idx.py); a folder: task's labels are
checked against its class count (sources.load_folder); frugal overwrites or replaces only files and
folders it wrote (cache.py). Every fault is a DataError naming the input and the fix.
"""

from frugal.data.cache import data_root
from frugal.data.corrupt import (CORRUPTIONS, HAND_CORRUPTIONS, LIBRARY_CORRUPTIONS, SEVERITIES, SLOW_CORRUPTIONS,
                                 build_corrupted_suite, corrupt_images, load_corrupted)
from frugal.data.derived import Cluttered, clutter
from frugal.data.errors import DataError
from frugal.data.idx import encode_idx, parse_idx, read_idx
from frugal.data.registry import (KNOWN, task_slug, DatasetInfo, default_val_size, fetch, format_dataset_table,
                                  list_datasets, load_arrays, load_task, split_indices)
from frugal.data.sources import Arrays, class_names
from frugal.data.types import Split, TaskData

__all__ = [
    "task_slug",
    "Arrays", "CORRUPTIONS", "Cluttered", "DataError", "DatasetInfo", "HAND_CORRUPTIONS", "KNOWN", "SLOW_CORRUPTIONS",
    "LIBRARY_CORRUPTIONS", "SEVERITIES", "Split", "TaskData", "build_corrupted_suite", "clutter",
    "corrupt_images", "data_root", "default_val_size", "encode_idx", "fetch", "format_dataset_table",
    "list_datasets", "load_arrays", "load_corrupted", "load_task", "parse_idx", "read_idx",
    "split_indices", "class_names",
]
