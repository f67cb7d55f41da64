"""DP-SGD (per-example or per-patient), embedding-release mechanisms and the per-site privacy ledger."""

from fedcl.privacy import _opacus  # noqa: F401  (first: Opacus without its root log handler)
from fedcl.privacy.dp import (
    DPParams,
    DPTrainer,
    PerExampleGradientError,
    check_per_example,
    dp_training_batches,
    make_dp_training,
    make_private,
    noise_for_budget,
    release_dp_training,
    sum_per_patient,
)
from fedcl.privacy.ledger import BudgetExceeded, LedgerEvent, PrivacyLedger
from fedcl.privacy.per_example import PerExampleModule
from fedcl.privacy.release import (
    PrototypeRelease,
    init_prototypes,
    merge_prototypes,
    release_gaussian,
    release_prototypes,
)
from fedcl.privacy.report import describe_privacy

__all__ = [
    "BudgetExceeded",
    "DPParams",
    "DPTrainer",
    "LedgerEvent",
    "PerExampleGradientError",
    "PerExampleModule",
    "PrivacyLedger",
    "PrototypeRelease",
    "check_per_example",
    "describe_privacy",
    "dp_training_batches",
    "init_prototypes",
    "make_dp_training",
    "make_private",
    "merge_prototypes",
    "noise_for_budget",
    "release_dp_training",
    "release_gaussian",
    "release_prototypes",
    "sum_per_patient",
]
