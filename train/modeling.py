"""The training view of a Llava model: which parts train, and a loss that can take cached vision features.

Promises:
- `LlavaForTraining(llava)` wraps a `LlavaForConditionalGeneration` (optionally with LoRA layers injected by PEFT)
  and computes the next-token loss from `input_ids`, `attention_mask`, `labels` and either `pixel_values` (the frozen
  vision encoder runs under no_grad) or `image_features` (already-selected encoder features from a FeatureCache).
  Both paths give the same projector input, so a cached run and an uncached run train the same function.
- Logits are computed only where a label exists (the assistant tokens), never over the 49k vocabulary for image and
  prompt positions.
- The loss is the mean over label tokens of the whole optimizer step: HF Trainer passes `num_items_in_batch` (the
  label tokens of all micro-batches and, with `average_tokens_across_devices`, of all processes), so a run on W
  processes x per-device batch b trains the same function as one process with batch W*b or with gradient
  accumulation (not a mean of per-device means).
- Every trainable tensor gets a gradient on every batch (a text-only batch projects zero images), as data-parallel
  training on several processes requires.
- `set_trainable(...)` freezes everything, then unfreezes the projector and/or the LLM (full); `add_lora(...)`
  injects PEFT LoRA into `model.language_model` only.
- `trainable_state(wrapper)` / `load_trainable(wrapper, state)` move exactly the trainable tensors (checkpoints
  stay small and a resume restores LoRA + projector together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava.templates import IGNORE_INDEX
from train.features import select_features

LORA_TARGETS = r".*model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_PREFIX = "model.multi_modal_projector."


class ImageTokenMismatch(ValueError):
    """The batch has a different number of `<image>` tokens than image features."""


class LlavaForTraining(nn.Module):
    """Loss-only forward of a Llava model; `self.model` is the Llava model or its PeftModel."""

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch
    loss_type = "ForCausalLM"  # Trainer counts items over labels[:, 1:], the positions this loss predicts

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def llava(self):
        """The underlying LlavaForConditionalGeneration (LoRA layers, if any, are injected in place)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def image_embeddings(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """[n_images, T, H]: projector(features); features come from the cache or the frozen encoder."""
        llava = self.llava
        if image_features is None:
            with torch.no_grad():
                image_features = select_features(
                    llava.model.vision_tower, pixel_values, llava.config.vision_feature_layer,
                    llava.config.vision_feature_select_strategy,
                )
        projector = llava.model.multi_modal_projector
        return projector(image_features.to(next(projector.parameters()).dtype))

    def no_images(self, like: torch.Tensor) -> torch.Tensor:
        """[0, 1, D] vision features. Projecting them adds exactly 0 to the loss but gives every projector tensor a
        (zero) gradient, so a process whose batch is text-only reduces the same tensors as the others: data-parallel
        reducers (DDP, DeepSpeed ZeRO buckets) otherwise exchange mismatched buffers and gloo aborts (the original
        LLaVA's `image_features[0:0]`)."""
        config = self.llava.config
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        return like.new_zeros(0, 1, config.vision_config.hidden_size * layers)

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_features=None, position_ids=None,
                num_items_in_batch=None):
        """attention_mask is [B, L] (padding) or a 4D boolean [B, 1, L, L] from `train.data.tree_mask` (with
        position_ids), which transformers passes to attention as is. `num_items_in_batch`: the step's label-token
        count (Trainer); the loss is then sum / count, else the mean over this batch."""
        llava = self.llava
        embeds = llava.get_input_embeddings()(input_ids)  # [B, L, H]
        if pixel_values is not None or image_features is not None:
            images = self.image_embeddings(pixel_values, image_features)  # [N, T, H]
            slots = input_ids == llava.config.image_token_id  # [B, L]
            if int(slots.sum()) != images.shape[0] * images.shape[1]:
                raise ImageTokenMismatch(
                    f"{int(slots.sum())} <image> tokens in the batch but {images.shape[0]} images x {images.shape[1]} "
                    "features"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), images.to(embeds.dtype))
        else:  # text-only batch: the projector still runs (on zero images), see `no_images`
            embeds = embeds + self.image_embeddings(image_features=self.no_images(embeds)).sum().to(embeds.dtype)
        hidden = llava.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        target = labels[:, 1:]  # token t predicts t+1
        keep = target != IGNORE_INDEX  # [B, L-1]
        logits = llava.lm_head(hidden[:, :-1][keep])  # [K, V] only at labelled positions
        if num_items_in_batch is None:
            return {"loss": F.cross_entropy(logits.float(), target[keep])}
        loss = F.cross_entropy(logits.float(), target[keep], reduction="sum") / num_items_in_batch
        return {"loss": loss}


def set_trainable(llava, *, projector: bool, llm: bool) -> None:
    """Freeze all of `llava`, then unfreeze the projector and/or the whole LLM (+ lm_head). Vision stays frozen."""
    for p in llava.parameters():
        p.requires_grad_(False)
    if projector:
        for p in llava.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    if llm:
        for p in llava.model.language_model.parameters():
            p.requires_grad_(True)
        for p in llava.lm_head.parameters():
            p.requires_grad_(True)


def add_lora(llava, *, r: int, alpha: int, dropout: float, train_projector: bool):
    """PEFT LoRA on the LLM's linear layers only; returns the PeftModel (projector unfrozen after injection)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(llava, config)
    if train_projector:
        for p in peft_model.get_base_model().model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    return peft_model


def trainable_state(wrapper: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in wrapper.named_parameters() if p.requires_grad}


def load_trainable(wrapper: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load exactly the trainable tensors; a missing or unexpected name is an error."""
    own = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    if set(state) != own:
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        raise KeyError(f"checkpoint does not match the trainable parameters: missing {missing[:5]}, unexpected {extra[:5]}")
    wrapper.load_state_dict(state, strict=False)


def projector_state(llava) -> dict[str, torch.Tensor]:
    """Projector tensors under their HF Llava names (model.multi_modal_projector.linear_1.weight, ...)."""
    return {PROJECTOR_PREFIX + n: t.detach().cpu().float().contiguous()
            for n, t in llava.model.multi_modal_projector.state_dict().items()}
