"""What a detection run prints beside the trainer's lines: box / mask AP after each evaluation."""
from __future__ import annotations

from typing import Any, Dict

from slaknet.train.trainer import Callback

__all__ = ["APLines", "ap_text"]


def ap_text(rec: Dict[str, Any], prefix: str = "val_") -> str:
    """``box AP 41.2 (AP50 80.1), mask AP 38.0`` from an evaluation record ('' when it has none)."""
    if prefix + "map" not in rec:
        return ""
    text = f"box AP {rec[prefix + 'map']:.1f} (AP50 {rec[prefix + 'map50']:.1f})"
    if prefix + "mask_map" in rec:
        text += f", mask AP {rec[prefix + 'mask_map']:.1f}"
    return text


class APLines(Callback):
    """Print ``  epoch N: val box AP ...`` after each epoch that was evaluated (rank 0)."""

    def on_epoch_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        text = ap_text(record)
        if text and trainer.dist.is_main:
            trainer.logger.print(f"  epoch {record['epoch'] + 1}/{trainer.cfg.epochs}: val {text}")

    def on_train_end(self, trainer: Any, summary: Dict[str, Any]) -> None:
        st = trainer.state
        if trainer.dist.is_main and st.best_epoch >= 0:
            trainer.logger.print(f"  best val box AP {st.best_metric:.1f} at epoch {st.best_epoch + 1} "
                                 "(COCO AP@[.50:.95], percent)")
