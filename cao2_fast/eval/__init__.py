"""Evaluation protocols for distilled sets: soft-label (RDED-style) and hard-label (IDC/Minimax-style); see
docs/evaluation.md.

``evaluate`` runs a whole protocol from folders or tensors; ``train_student`` / ``fit_student`` train one student on
in-memory tensors; ``check_class_order`` guards against a teacher whose outputs follow another class order.
"""

from .api import DIGITS_SETTINGS, DIGITS_STUDENT, default_json_path, evaluate, prepare, run
from .data import ImageSet, cutmix, load_image_folder, patch_shuffle, random_resized_crop
from .protocols import Protocol, TrainConfig, TrainResult, default_config, fit_student, kd_loss, train_student
from .teacher import ClassOrderReport, check_class_order, class_order_report, load_teacher

__all__ = [
           "DIGITS_SETTINGS",
           "DIGITS_STUDENT",
           "ClassOrderReport",
           "ImageSet",
           "Protocol",
           "TrainConfig",
           "TrainResult",
           "check_class_order",
           "class_order_report",
           "cutmix",
           "default_config",
           "default_json_path",
           "evaluate",
           "fit_student",
           "kd_loss",
           "load_image_folder",
           "load_teacher",
           "patch_shuffle",
           "prepare",
           "random_resized_crop",
           "run",
           "train_student",
]
