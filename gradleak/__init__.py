"""gradleak: what one training example's gradient leaks: its (soft) label, its last-layer feature, its input."""
from .batch.api import BatchRecoveryResult, recover_batch
from .batch.split import BatchSplit, split_batch
from .client import single_example_gradients, soft_cross_entropy
from .labels import LabelSpec, hard_label, mix_inputs, mixup_label, smooth_label
from .reconstruct import invert_fully_connected, match_gradients
from .recovery import RecoveryResult, RecoveryResults, recover_from_gradients, recover_label, recover_labels
from .update import recover_from_update, update_from_weights

__version__ = "0.1.0"
__all__ = [
    "BatchRecoveryResult", "BatchSplit", "LabelSpec", "RecoveryResult", "RecoveryResults", "hard_label",
    "invert_fully_connected", "match_gradients", "mix_inputs", "mixup_label", "recover_batch",
    "recover_from_gradients", "recover_from_update", "recover_label", "recover_labels", "single_example_gradients",
    "smooth_label", "soft_cross_entropy", "split_batch", "update_from_weights",
]
