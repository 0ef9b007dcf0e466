"""Frozen open_clip backbones (``backbone``) and the prompted forward every method shares (``clip``:
the text and vision towers driven block by block, ``kv_prompts`` for key/value-only prompts)."""

from mlgate.model.backbone import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, load_backbone
from mlgate.model.clip import PromptedCLIP

__all__ = ["EMBEDDED_BACKBONE", "EMBEDDED_WEIGHTS", "PromptedCLIP", "load_backbone"]
