"""Frozen open_clip backbones: any open_clip model by name, with a pretrained tag, a local checkpoint
or random init, through open_clip's own factory; and mlgate's embedded backbone, ``mlgate-tiny``, an
ordinary open_clip model config (``configs/``) with weights shipped in ``weights/``."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
from pathlib import Path

import open_clip
import torch

from mlgate.errors import MlgateError
from mlgate.model.clip import PromptedCLIP

EMBEDDED_BACKBONE = "mlgate-tiny"
EMBEDDED_WEIGHTS = "mlgate"  # the pretrained tag of the weights shipped in weights/
CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
open_clip.add_model_config(CONFIG_DIR)


def load_backbone(name: str, pretrained: str | None, device: torch.device | str = "cpu") -> PromptedCLIP:
    """Create a frozen :class:`PromptedCLIP` from an open_clip model name.

    ``pretrained`` is an open_clip pretrained tag (``openai``), a local checkpoint path, or None for
    random init. Loading problems become :class:`MlgateError` naming the weights. The last pretrained
    weights loaded stay in host memory, so the trials of a study load them once; each call gets its
    own copy.
    """
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:8]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise MlgateError(
            f"backbone.name: unknown open_clip model {name!r}.{hint} The embedded default is "
            f"{EMBEDDED_BACKBONE!r}; `python -c 'import open_clip; print(open_clip.list_models())'` lists all."
        )
    if pretrained is None:  # random init: the weights are the caller's draw
        return PromptedCLIP(_create(name, None, device), _tokenizer(name), name)
    model = _LOADED.get(name, pretrained)
    return PromptedCLIP(copy.deepcopy(model).to(device), _tokenizer(name), name)


class _LastLoaded:
    """The last pretrained weights loaded, on the CPU. Creating a model draws its random init from the
    global generator before the weights replace it, and a trial's later draws (prompt and gate init)
    follow from there: a copy advances the generator as creating it did from the same state."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None
        self.rng_after: dict[bytes, torch.Tensor] = {}  # generator state before creating → after

    def get(self, name: str, pretrained: str) -> torch.nn.Module:
        key = (name, pretrained, _file_identity(name, pretrained))
        before = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).digest()
        if key == self.key and before in self.rng_after:
            torch.set_rng_state(self.rng_after[before])
            return self.model
        model = (_load_embedded(name) if pretrained == EMBEDDED_WEIGHTS else _create(name, pretrained, "cpu"))
        if key != self.key:
            self.key, self.rng_after = key, {}
        self.model = model
        self.rng_after[before] = torch.get_rng_state()
        return model


def _file_identity(name: str, pretrained: str) -> tuple | None:
    # Weights read from a file are reloaded when the file changes.
    path = WEIGHTS_DIR / f"{name}.pt" if pretrained == EMBEDDED_WEIGHTS else Path(pretrained)
    with contextlib.suppress(OSError):
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns
    return None


_LOADED = _LastLoaded()


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    return open_clip.get_tokenizer(name)


def _create(name: str, pretrained: str | None, device: torch.device | str) -> torch.nn.Module:
    try:
        with _quiet_random_init(), _quiet_download_errors():
            return open_clip.create_model(
                name, pretrained=pretrained, device=device, require_pretrained=pretrained is not None
            )
    except Exception as exc:  # download / file / state-dict errors: say which weights and how to provide them
        raise MlgateError(
            f"backbone.pretrained: could not load weights {pretrained!r} for {name!r} ({exc}). Give an "
            "open_clip pretrained tag whose weights are cached or downloadable, or a local checkpoint "
            "path (backbone.pretrained=/path/to/model.pt); set backbone.pretrained=null for random init."
        ) from None


@contextlib.contextmanager
def _quiet_random_init():
    # Random init is asked for explicitly (pretrained=None); open_clip's warning about it is noise.
    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def _quiet_download_errors():
    # open_clip and huggingface_hub log each failed download attempt; the error mlgate raises says it once.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def embedded_weights_info() -> dict:
    """Checksum, training settings and zero-shot figures recorded with the shipped weights."""
    return json.loads((WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.json").read_text())


def _load_embedded(name: str) -> torch.nn.Module:
    # The shipped, pretrained mlgate-tiny (see mlgate.model.pretrain): checked against its recorded sha256.
    if name != EMBEDDED_BACKBONE:
        raise MlgateError(f"backbone.pretrained: {EMBEDDED_WEIGHTS!r} weights exist for {EMBEDDED_BACKBONE!r} "
                          f"only, not {name!r}; give an open_clip tag or a checkpoint path for {name!r}.")
    path = WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.pt"
    if not path.is_file():
        raise MlgateError(f"backbone: the embedded weights {path} are missing from this install; reinstall "
                          "mlgate or rebuild them with `python -m mlgate.model.pretrain`.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = embedded_weights_info()["sha256"]
    if digest != expected:
        raise MlgateError(f"backbone: {path} does not match its checksum (sha256 {digest[:12]}…, expected "
                          f"{expected[:12]}…); reinstall mlgate or rebuild with `python -m mlgate.model.pretrain`.")
    with _quiet_random_init():  # random init is immediately overwritten by the shipped weights
        model = open_clip.create_model(EMBEDDED_BACKBONE, pretrained=None)
    load_compact(model, path)
    return model


def save_compact(model: torch.nn.Module, token_ids: torch.Tensor, path: Path) -> str:
    """Write fp16 weights with only ``token_ids`` rows of the token embedding; returns the sha256."""
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()
             if k != "token_embedding.weight" and v.is_floating_point()}
    state.update({k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()})
    rows = model.token_embedding.weight.detach()[token_ids].to(torch.float16).clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "token_ids": token_ids.clone(), "token_rows": rows}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_compact(model: torch.nn.Module, path: Path) -> None:
    """Load weights written by :func:`save_compact` into a freshly created ``mlgate-tiny``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()}
    table = torch.zeros_like(model.token_embedding.weight)
    table[blob["token_ids"]] = blob["token_rows"].float()
    state["token_embedding.weight"] = table
    model.load_state_dict(state)
