"""dsv3: a DeepSeek-V3 / R1 engine — the Python binding (ctypes over the C ABI, include/dsv3.h).

The C library (libdsv3.so) is found through $DSV3_LIBRARY, else target/release or target/debug of
the repository checkout this package lives in, else ctypes.util.find_library("dsv3").

    import dsv3

    with dsv3.Model.load("tests/fixtures/v3_tiny") as model:
        ids = model.generate([1, 2, 3], max_new_tokens=8)

Every failed call raises Dsv3Error, with `.code` (a Status) and `.message` (the library's message).
"""

from ._ffi import ABI_VERSION, Dsv3Error, Status, version
from ._grpo import Grpo, LossType, ScaleRewards, default_grpo_params
from ._model import Model, ModelInfo, Session
from ._tokenizer import Tokenizer
from ._trainer import Precision, Schedule, StepMetrics, Trainer, default_train_params

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "Dsv3Error",
    "Grpo",
    "LossType",
    "Model",
    "ModelInfo",
    "Precision",
    "ScaleRewards",
    "Schedule",
    "Session",
    "Status",
    "StepMetrics",
    "Tokenizer",
    "Trainer",
    "default_grpo_params",
    "default_train_params",
    "version",
]
