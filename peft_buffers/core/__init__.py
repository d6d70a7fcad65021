"""The core: plain torch, knows nothing of PEFT.

Find a model's base state and name it (:mod:`._state`), keep one value per adapter and find what training
changed (:mod:`._store`), validate an incoming state dict before anything changes (:mod:`._load_plan`,
:mod:`._adapter_file`), run a load as one transaction (:mod:`._transaction`), and publish a saved folder
atomically (:mod:`._publish`). The layers above (:mod:`peft_buffers.binding`, then the tools) import from
here; nothing here imports them.
"""

from ._adapter_file import (
    TensorHeader,
    check_adapter_path,
    check_safetensors_file,
    check_state_dict_fits,
    find_weights_file,
    verify_adapter_path,
)
from ._base_identity import (
    SIDECAR_NAME,
    BaseIdentity,
    TensorRecord,
    base_differences,
    describe_quantization,
    read_sidecar,
    write_sidecar,
)
from ._copies import host_copies, same_bytes
from ._fingerprint import FINGERPRINT_FORMAT, fingerprint, fingerprints, start_fingerprints
from ._load_plan import LoadPlan, plan_load, raise_for_mismatches, resolve_key
from ._publish import PENDING_NAME, StagedFolder, check_folder_complete, stage
from ._state import (
    BASE,
    RUNNING_STAT_NAMES,
    BaseTensors,
    ModelView,
    TensorPlace,
    find_base_tensors,
    find_running_stats,
    find_trainable_parameters,
    is_running_stat,
    tracks_running_stats,
)
from ._store import ExtraStateStore, install_optimizer_hook, remove_optimizer_hook
from ._transaction import Transaction, active_transaction, atomic, exclusive, run_atomically

__all__ = [
    "BASE",
    "BaseIdentity",
    "BaseTensors",
    "ExtraStateStore",
    "FINGERPRINT_FORMAT",
    "LoadPlan",
    "ModelView",
    "PENDING_NAME",
    "RUNNING_STAT_NAMES",
    "SIDECAR_NAME",
    "StagedFolder",
    "TensorHeader",
    "TensorPlace",
    "TensorRecord",
    "Transaction",
    "active_transaction",
    "atomic",
    "base_differences",
    "check_adapter_path",
    "check_folder_complete",
    "check_safetensors_file",
    "check_state_dict_fits",
    "describe_quantization",
    "exclusive",
    "find_base_tensors",
    "find_running_stats",
    "find_trainable_parameters",
    "find_weights_file",
    "fingerprint",
    "fingerprints",
    "host_copies",
    "install_optimizer_hook",
    "is_running_stat",
    "plan_load",
    "raise_for_mismatches",
    "read_sidecar",
    "remove_optimizer_hook",
    "resolve_key",
    "run_atomically",
    "same_bytes",
    "stage",
    "start_fingerprints",
    "tracks_running_stats",
    "verify_adapter_path",
    "write_sidecar",
]
