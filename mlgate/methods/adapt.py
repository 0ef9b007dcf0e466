"""ADAPT (Huang et al.): saliency-pruned deep prompts with heterogeneous context lengths.

Prompts P_text (ℓ_g × ξ_g × d_t) and P_vision (ℓ_f × ξ_f × d_v) join the keys and values of
self-attention at every layer (Eq. 7-8), under binary masks that start all ones. While the total
active length exceeds ``t_target``, saliency scores (Eq. 6: Snip |∂L/∂P ⊙ P|, gradient norm, or l2 norm,
per token) are accumulated; at every ``n_k``-th step after the warmup the ``r_p`` lowest-scoring active
tokens across both branches are pruned (never below ``t_target``) and the scores reset (Algorithm 1).
Masked tokens take no part in attention (the paper's P ⊙ M: its FLOPs fall with T_target, and a zeroed
token would still be attended, as the constant ln_1(0) = β). After training the prompts are compacted.
Optional angular knowledge distillation (the TMLR revision): 1 − cos to the frozen model's embeddings.

Prompts go through each block's ``ln_1`` with the tokens, which discards their scale: a random token
becomes a full-norm key and value, and a layer's prompts can draw most of the attention of a short
class prompt. By default each token therefore starts at the mean token state its layer sees (its key
gets about the average logit, its value is about what queries already read) plus the random init, so
untrained prompts leave the frozen model nearly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlgate.config.methods import AdaptConfig
from mlgate.config.pruning import plan_pruning
from mlgate.diagnostics import depth_metrics
from mlgate.errors import MlgateError
from mlgate.methods._registry import register
from mlgate.methods.base import PromptMethod


INIT_STD = 0.02  # the random init's per-element standard deviation (the paper's, DPL's)


class PruningSchedule:
    """When to prune how many tokens: ``r_p`` every ``n_k`` steps after the warmup, as
    :func:`~mlgate.pruning.plan_pruning` plans it (``n_k`` derived from the step budget unless given)."""

    def __init__(self, depth: int, cfg: AdaptConfig, total_steps: int, steps_per_epoch: int = 1) -> None:
        self.plan = plan_pruning(depth, cfg.max_len, cfg.t_target, cfg.r_p, cfg.n_k, cfg.warmup_steps,
                                 cfg.warmup_epochs, total_steps, steps_per_epoch)
        self.warmup, self.n_k, self.r_p = self.plan.warmup, self.plan.n_k, self.plan.r_p

    def is_prune_step(self, step: int) -> bool:
        return step > self.warmup and (step - self.warmup) % self.n_k == 0


@register("adapt")
class Adapt(PromptMethod):
    Config = AdaptConfig
    prompts_vision = True

    def __init__(self, clip, classnames: list[str], cfg: AdaptConfig) -> None:
        super().__init__(clip, cfg)
        layers = clip.num_layers
        if cfg.depth is not None and cfg.depth > layers:
            raise ValueError(f"method.depth {cfg.depth} exceeds the {layers} layers of backbone {clip.name!r}")
        self.depth = cfg.depth or layers
        device = clip.text.token_embedding.weight.device
        self.classnames = list(classnames)
        self._embed_text()
        shape = (self.depth, cfg.max_len)
        self.text_prompts = nn.Parameter(torch.randn(*shape, clip.text_width, device=device) * INIT_STD)
        self.vision_prompts = nn.Parameter(torch.randn(*shape, clip.vision_width, device=device) * INIT_STD)
        self._vision_started = cfg.init != "mean"  # the vision prompts wait for init_from_data's images
        if cfg.init == "mean":
            states = clip.text_layer_inputs(self.text_embeds)
            real = torch.arange(self.text_embeds.shape[1], device=device) <= self.eot[:, None]  # up to EOT
            self._add_mean_direction(self.text_prompts, (s[real] for s in states))
        self.register_buffer("text_mask", torch.ones(shape, device=device))
        self.register_buffer("vision_mask", torch.ones(shape, device=device))
        self.register_buffer("text_scores", torch.zeros(shape, device=device))
        self.register_buffer("vision_scores", torch.zeros(shape, device=device))
        # Active-token count kept on the host, so the per-step check costs no device sync; prune() keeps it.
        self._active = 2 * self.depth * cfg.max_len
        self.schedule: PruningSchedule | None = None
        self.pruned: list[dict] = []  # the pruning log: which token, when, its score
        # (step, text mask, vision mask) at each epoch's end, on the device until the artifacts are
        # written: a copy to the host each epoch would sync with the GPU there.
        self.snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.compact: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._distill: torch.Tensor | None = None  # this step's distillation term

    def _embed_text(self) -> None:
        # The query tokens: the template with each class name, trimmed to the longest.
        tokens = self.clip.tokenize([self.cfg.template.format(name) for name in self.classnames])
        eot = self.clip.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1]
        with torch.no_grad():
            self.register_buffer("text_embeds", self.clip.embed_tokens(tokens).clone(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)

    def init_from_data(self, images: torch.Tensor) -> None:
        """With ``init`` mean, start the vision prompts at the mean token state over ``images``."""
        if not self._vision_started:
            states = self.clip.image_layer_inputs(images.to(self.vision_prompts.device))
            self._add_mean_direction(self.vision_prompts, (s.flatten(0, 1) for s in states))
            self._vision_started = True

    @torch.no_grad()
    def _add_mean_direction(self, prompts: nn.Parameter, states: Iterable[torch.Tensor]) -> None:
        # Every token of layer k gets the direction of the mean state (T, D) at layer k's input, at the
        # random init's norm (ln_1 keeps only the direction, and the norm sets the effective step size
        # and what the l2 and gradient-norm scores compare). The random part keeps the tokens distinct.
        for layer, tokens in zip(prompts, states):
            mean = tokens.float().mean(0)
            mean = mean - mean.mean()  # ln_1 removes it anyway
            layer += (INIT_STD * mean.numel() ** 0.5 * mean / mean.norm().clamp_min(1e-12)).to(layer.dtype)

    # ---- parameters and metrics ----------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.text_prompts, self.vision_prompts]}

    def active_tokens(self) -> int:
        return int(self.text_mask.sum() + self.vision_mask.sum())

    def metrics(self) -> dict[str, torch.Tensor]:
        text, vision = self.text_mask.sum(1), self.vision_mask.sum(1)
        out = {"mask/active_tokens": text.sum() + vision.sum(), "mask/active_tokens/text": text.sum(),
               "mask/active_tokens/vision": vision.sum()}
        for k in range(self.depth):
            out[f"mask/active_tokens/d{k}"] = text[k] + vision[k]
            out[f"mask/active_tokens/text/d{k}"] = text[k]
            out[f"mask/active_tokens/vision/d{k}"] = vision[k]
        if self.text_prompts.grad is not None and self.vision_prompts.grad is not None:
            # Both towers' prompts at depth k together: how far the gradient reaches down.
            per_depth = torch.linalg.vector_norm(torch.cat([self.text_prompts.grad.flatten(1),
                                                            self.vision_prompts.grad.flatten(1)], 1), dim=1)
            out.update(depth_metrics(per_depth))
        return out

    # ---- forward -------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compact is not None:
            text_prompts, vision_prompts = self.compact
            text_active = vision_active = None
        else:
            text_prompts, vision_prompts = list(self.text_prompts), list(self.vision_prompts)
            text_active, vision_active = self.text_mask, self.vision_mask  # (depth, max_len): masks built at once
        text = self.clip.encode_text_kv(self.text_embeds[class_ids], self.eot[class_ids], text_prompts, text_active)
        image = self.clip.encode_image_kv(images, vision_prompts, vision_active)
        text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
        if self.training and self.cfg.distill_weight > 0:
            self._distill = self._angular_distillation(images, class_ids, text, image)
        return image, text

    def _angular_distillation(self, images, class_ids, text, image) -> torch.Tensor:
        # 1 − cos between the prompted and the frozen model's embeddings (PromptSRC-style self-regulation).
        with torch.no_grad():
            frozen_text = F.normalize(self.clip.encode_text_kv(self.text_embeds[class_ids], self.eot[class_ids], []), dim=-1)
            frozen_image = F.normalize(self.clip.encode_image(images), dim=-1)
        return (1 - (text * frozen_text).sum(-1)).mean() + (1 - (image * frozen_image).sum(-1)).mean()

    def regularizers(self) -> dict[str, torch.Tensor]:
        if self.training and self.cfg.distill_weight > 0 and self._distill is not None:
            return {"distill": self.cfg.distill_weight * self._distill}
        return {}

    # ---- pruning (Algorithm 1) -------------------------------------------------------------------------

    def token_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's saliency per token (ℓ × ξ) for the text and the vision branch (Eq. 6)."""
        def score(p: nn.Parameter) -> torch.Tensor:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.cfg.score == "snip":
                return (g * p).abs().sum(-1)
            if self.cfg.score == "grad_norm":
                return g.norm(dim=-1)
            return p.detach().norm(dim=-1)

        return score(self.text_prompts).detach(), score(self.vision_prompts).detach()

    def on_backward(self, step: int) -> None:
        if self._active > self.cfg.t_target:
            text, vision = self.token_scores()
            self.text_scores += text
            self.vision_scores += vision

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        self.schedule = PruningSchedule(self.depth, self.cfg, total_steps, steps_per_epoch)
        if not self.schedule.plan.reaches:  # (spec validation and the preflight refuse such specs first)
            raise MlgateError(f"method: {self.schedule.plan.problem()}")

    def on_step(self, step: int, total_steps: int) -> None:
        if self.schedule is None:  # driven without train() (the benchmark): steps only
            self.schedule = PruningSchedule(self.depth, self.cfg, total_steps)
        if not self.schedule.is_prune_step(step):
            return
        excess = self._active - self.cfg.t_target
        if excess > 0:
            self.prune(min(self.schedule.r_p, excess), step)
        self.text_scores.zero_()
        self.vision_scores.zero_()

    @torch.no_grad()
    def prune(self, n: int, step: int) -> None:
        """Mask the ``n`` active tokens with the lowest accumulated score across both branches."""
        scores = torch.cat([self.text_scores.flatten(), self.vision_scores.flatten()])
        active = torch.cat([self.text_mask.flatten(), self.vision_mask.flatten()]).bool()
        scores = scores.masked_fill(~active, float("inf"))  # never prune a token twice
        order = torch.argsort(scores)[:n]
        # One read of the choice and its scores, and one masking op per branch (not a read and a
        # kernel per token).
        chosen, chosen_scores = order.tolist(), scores[order].tolist()
        half = self.text_mask.numel()
        masked: dict[str, list[int]] = {"text": [], "vision": []}
        for flat, score in zip(chosen, chosen_scores):
            branch, idx = ("text", flat) if flat < half else ("vision", flat - half)
            depth, slot = divmod(idx, self.cfg.max_len)
            masked[branch].append(idx)
            self.pruned.append({"step": step, "branch": branch, "depth": depth, "slot": slot, "score": score})
        for branch, flat_ids in masked.items():
            if flat_ids:  # in place: compiled steps read these buffers
                mask = getattr(self, f"{branch}_mask")
                mask.view(-1)[torch.tensor(flat_ids, device=mask.device)] = 0.0
        self._active -= len(chosen)

    # ---- artifacts and the final compact model --------------------------------------------------------

    def on_epoch_end(self, step: int) -> None:
        self.snapshots.append((step, self.text_mask.clone(), self.vision_mask.clone()))

    def _host_snapshots(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        return [(step, text.cpu().numpy(), vision.cpu().numpy()) for step, text, vision in self.snapshots]

    def save_artifacts(self, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        masks = folder / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        for step, text, vision in self._host_snapshots():
            np.save(masks / f"step_{step:06d}_text.npy", text)
            np.save(masks / f"step_{step:06d}_vision.npy", vision)
            fig, axes = plt.subplots(1, 2, figsize=(8, 0.4 * self.depth + 1.2))
            for ax, mask, branch in zip(axes, (text, vision), ("text", "vision")):
                ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
                ax.set(title=f"{branch}: {int(mask.sum())} active", xlabel="token slot", ylabel="depth")
            fig.suptitle(f"ADAPT masks at step {step}")
            fig.tight_layout()
            fig.savefig(masks / f"step_{step:06d}.png", dpi=80)
            plt.close(fig)
        schedule = {"n_k": self.schedule.n_k if self.schedule else None,
                    "r_p": self.schedule.r_p if self.schedule else None,
                    "warmup_steps": self.schedule.warmup if self.schedule else self.cfg.warmup_steps,
                    "t_target": self.cfg.t_target, "pruned": self.pruned}
        (folder / "adapt").mkdir(exist_ok=True)
        (folder / "adapt" / "pruning_schedule.json").write_text(json.dumps(schedule, indent=1))

    def images(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        from mlgate.training.plots import mask_image

        return {"adapt_masks": [(step, mask_image(text, vision)) for step, text, vision in self._host_snapshots()]}

    @torch.no_grad()
    def finalize(self) -> dict[str, float]:
        """Compact the prompts to their active tokens: inference compute and parameter count follow."""
        text = [p[m.bool()].clone() for p, m in zip(self.text_prompts, self.text_mask)]
        vision = [p[m.bool()].clone() for p, m in zip(self.vision_prompts, self.vision_mask)]
        self.compact = (text, vision)
        params = sum(t.numel() for t in text) + sum(v.numel() for v in vision)
        return {"params/trainable": float(params), "mask/active_tokens": float(self.active_tokens())}
