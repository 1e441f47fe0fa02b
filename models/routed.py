"""A routed network: a side-input network and a ``cnn`` network in one bundle, each poster scored by one of them.

Why: the side-input (``fused``) model gains where a poster has metadata and can lose to the CNN
alone where it has none — the normal case on a catalogue from another source. Routing by what the
poster has gives each slice the network that validation found better on it (``posterfusion route``
chooses and records it in :class:`~posterfusion.models.fusion.Routing`), so a poster without
metadata can be ranked exactly as the ``cnn`` bundle ranks it while one with metadata keeps the gain.

Each network's raw logits pass through the calibration fitted for its slice, so the routed network
already returns *calibrated* logits (its bundle's own calibration is the identity): probabilities
of the two networks are comparable across slices, which a genre's ranking over a whole catalogue
needs. Scoring costs one network per poster (each runs on its rows only); embeddings are the
``cnn`` network's for every poster, one space for similarity search, at the price of running it on
every row when they are asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from posterfusion.models.fusion import SLICES, FusionConfig


class RoutedNet(nn.Module):
    """``side`` (a network reading metadata) and ``cnn``, routed per poster by the metadata presence column."""

    def __init__(self, config: FusionConfig, side: nn.Module, cnn: nn.Module):
        super().__init__()
        if config.routing is None:
            raise ValueError("a RoutedNet needs a config with routing")
        self.config, self.routing = config, config.routing
        self.side, self.cnn = side, cnn
        for name in SLICES:  # not persistent: the bundle's config.json holds them, the weights file the networks
            calibration = self.routing.calibration[name]
            for part in ("shift", "scale", "bias"):
                self.register_buffer(f"{name}_{part}", torch.tensor(getattr(calibration, part)), persistent=False)

    @property
    def uses_objects(self) -> bool:
        return self.config.uses_objects

    @property
    def uses_metadata(self) -> bool:
        return True  # the presence column routes every poster

    def forward(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated logits ``(N, genres)``, each row from the network its slice is routed to."""
        return self._routed(images, objects, metadata)

    def embed_and_logits(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                         metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the cnn network's penultimate features for every row, the routed calibrated logits)."""
        hidden, cnn_logits = self.cnn.embed_and_logits(images)
        return hidden, self._routed(images, objects, metadata, cnn_logits=cnn_logits)

    def slices(self, metadata: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each slice's rows (boolean masks) by the metadata presence column."""
        if metadata is None:
            raise ValueError("a routed network needs the metadata vector: its presence column routes each poster")
        present = metadata[:, self.routing.presence] > 0.5
        return {"with_metadata": present, "without_metadata": ~present}

    def _routed(self, images, objects, metadata, cnn_logits: torch.Tensor | None = None) -> torch.Tensor:
        slices = self.slices(metadata)
        out = torch.zeros(len(images), self.config.num_genres, device=images.device)
        for route, network in (("cnn", self.cnn), ("side", self.side)):
            names = [name for name in SLICES if self.routing.routes[name] == route]
            rows = torch.zeros(len(images), dtype=torch.bool, device=images.device)
            for name in names:
                rows |= slices[name]
            if not rows.any():
                continue
            index = rows.nonzero().squeeze(1)
            if route == "cnn" and cnn_logits is not None:
                logits = cnn_logits[index]
            else:
                logits = network(images[index], _rows(objects, index), _rows(metadata, index))
            for name in names:
                chosen = slices[name][index]
                out[index[chosen]] = self._calibrated(name, logits[chosen].float())
        return out

    def _calibrated(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        shift, scale, bias = (getattr(self, f"{name}_{part}") for part in ("shift", "scale", "bias"))
        return scale * (logits - shift) + bias


def _rows(side: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if side is None else side[index]
