"""An output ensemble of fusion networks that fine-tuned apart from one warmed-up head.

Averaging the logits of several fine-tuning runs is the one lever that lifted validation AUC
on this project's posters where averaging their *weights* (a model soup) did not
(docs/results.md). Its price is inference: each member is a whole network. The members of a
``posterfusion train --members N`` run, though, fine-tune only the backbone's last stages
from one checkpoint, so every lower stage holds the same frozen weights in all of them: those
``shared_stages`` run once per batch and only the fine-tuned top of the backbone and the head
run per member (for MobileNetV2's last two stages about a third of its multiply-adds).

The state dict keeps each member whole (``members.{i}.…``, the frozen stages stored once per
member: a few MB), so a member can be read back as an ordinary :class:`FusionNet`; loading
checks that the stages said to be shared really are equal, so a bundle never silently runs
one member's trunk under another's top.
"""

from __future__ import annotations

import torch
from torch import nn

from posterfusion.models.fusion import FusionConfig, FusionNet


class EnsembleNet(nn.Module):
    """``config.members`` :class:`FusionNet` s; logits averaged, penultimate features side by side."""

    def __init__(self, config: FusionConfig, load_weights: bool = True):
        super().__init__()
        if config.members < 2:
            raise ValueError("an ensemble needs members >= 2")
        self.config = config
        member = config.model_copy(update={"members": 1, "shared_stages": 0})
        self.members = nn.ModuleList(FusionNet(member, load_weights=load_weights) for _ in range(config.members))
        backbone = self.members[0].backbone
        if config.shared_stages and not backbone.sequential_stages:
            raise ValueError(f"{config.backbone} cannot share stages between members (not sequential)")
        if config.shared_stages >= len(backbone.stages()):
            raise ValueError(f"shared_stages {config.shared_stages} leaves no stage to {config.backbone}'s members")

    @property
    def uses_objects(self) -> bool:
        return self.config.uses_objects

    @property
    def uses_metadata(self) -> bool:
        return self.config.uses_metadata

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.check_shared_stages()
        return result

    def check_shared_stages(self) -> None:
        """Raise unless every member's shared stages hold the first member's weights exactly."""
        equal = equal_leading_stages([member.backbone for member in self.members])
        if equal < self.config.shared_stages:
            raise ValueError(f"the ensemble's members differ in backbone stage {equal}, one of the "
                             f"{self.config.shared_stages} stages the bundle says they share")

    def embed_and_logits(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                         metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(members' penultimate features concatenated, their mean logits); the shared stages run once."""
        hidden, logits = [], []
        for member, pooled in zip(self.members, self.member_features(images), strict=True):
            h, z = member.features_to_outputs(pooled, objects, metadata)
            hidden.append(h)
            logits.append(z)
        return torch.cat(hidden, dim=1), torch.stack(logits).mean(dim=0)

    def member_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's pooled backbone features; the stages they share run once, for all of them."""
        shared = self.config.shared_stages
        trunk = self.members[0].backbone.forward_stages(images, 0, shared) if shared else images
        return [member.backbone.forward_stages(trunk, shared) for member in self.members]

    def branch_logits(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                      metadata: torch.Tensor | None = None, pooled: bool = False) -> dict[str, torch.Tensor]:
        """The members' mean poster logits and mean side corrections (unscaled): the mean of sums is the
        sum of means, so a correction weight fitted on these applies to every member alike."""
        if pooled:
            raise ValueError("an ensemble takes images: its members' backbones differ in their top stages")
        parts = [member.branch_logits(pooled, objects, metadata, pooled=True)
                 for member, pooled in zip(self.members, self.member_features(images), strict=True)]
        return {name: torch.stack([p[name] for p in parts]).mean(dim=0) for name in parts[0]}

    def embed(self, images: torch.Tensor, objects: torch.Tensor | None = None,
              metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_and_logits(images, objects, metadata)[0]

    def forward(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None, pooled: bool = False) -> torch.Tensor:
        """Mean genre logits of the members (an ensemble is bundled after training: images only)."""
        if pooled:
            raise ValueError("an ensemble takes images: its members' backbones differ in their top stages")
        return self.embed_and_logits(images, objects, metadata)[1]


def equal_leading_stages(backbones: list) -> int:
    """How many leading stages hold the same weights in every backbone (never the last: a member
    needs a stage of its own). 0 for a backbone that cannot run part of its stages."""
    if not backbones[0].sequential_stages:
        return 0
    stages = [backbone.stages() for backbone in backbones]
    count = 0
    for i in range(len(stages[0]) - 1):
        first = stages[0][i].state_dict()
        if not all(torch.equal(first[k], other[i].state_dict()[k]) for other in stages[1:] for k in first):
            break
        count += 1
    return count


def members_shared_stages(config: FusionConfig, states: list[dict]) -> int:
    """The stages members trained apart from one checkpoint still share, read from their weights:
    the frozen ones (BatchNorm statistics included), whatever the training settings claimed."""
    member = config.model_copy(update={"members": 1, "shared_stages": 0})
    nets = []
    for state in states:
        net = FusionNet(member, load_weights=False)
        net.load_state_dict(state)
        nets.append(net)
    return equal_leading_stages([net.backbone for net in nets])


def ensemble_state(states: list[dict]) -> dict:
    """One state dict for :class:`EnsembleNet` from its members' :class:`FusionNet` state dicts."""
    return {f"members.{i}.{key}": value for i, state in enumerate(states) for key, value in state.items()}
