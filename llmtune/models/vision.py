"""Image classifiers built from zero - a small CNN and an MLP - as transformers models.

They are ordinary PreTrainedModel / PretrainedConfig pairs, registered with the Auto classes when this module is
imported, so a run saves and loads with save_pretrained / from_pretrained and every command that loads a run
(eval, predict, push, export) treats them like any checkpoint. How pixels are prepared (size, channels, mean, std)
is kept in the config, so a saved model carries its own preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

FIRST_CHANNELS = 32  # a cnn's first block; each further block doubles it


class _ImageConfig(PreTrainedConfig):
    num_channels: int = 1
    image_size: int = 28
    layers: int = 2
    hidden_size: int = 128
    dropout: float = 0.1
    image_mean: list[float] | None = None  # per channel, of pixels scaled to [0, 1]; measured on the training data
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        self.image_mean = self.image_mean or [0.5] * self.num_channels
        self.image_std = self.image_std or [0.5] * self.num_channels
        super().__post_init__(**kwargs)


class SmallCnnConfig(_ImageConfig):
    model_type = "llmtune_cnn"


class MlpConfig(_ImageConfig):
    model_type = "llmtune_mlp"


class _ImageClassifier(PreTrainedModel):
    main_input_name = "pixel_values"
    base_model_prefix = "body"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()  # torch's own initialisation

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        logits = self.classifier(self.body(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class SmallCnnForImageClassification(_ImageClassifier):
    """[conv 3x3 -> ReLU -> max-pool 2] x layers -> dense (hidden_size) -> classes."""

    config_class = SmallCnnConfig

    def __init__(self, config: SmallCnnConfig):
        super().__init__(config)
        blocks, channels, size = [], config.num_channels, config.image_size
        for i in range(config.layers):
            out = FIRST_CHANNELS * 2**i
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = out, size // 2
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Dropout(config.dropout),
                                  nn.Linear(channels * size * size, config.hidden_size), nn.ReLU(),
                                  nn.Dropout(config.dropout))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class MlpForImageClassification(_ImageClassifier):
    """Flattened pixels -> [dense (hidden_size) -> ReLU -> dropout] x layers -> classes."""

    config_class = MlpConfig

    def __init__(self, config: MlpConfig):
        super().__init__(config)
        layers, width = [nn.Flatten()], config.num_channels * config.image_size**2
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden_size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_size
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()


SCRATCH_MODELS = {"cnn": (SmallCnnConfig, SmallCnnForImageClassification),
                  "mlp": (MlpConfig, MlpForImageClassification)}
for _config, _model in SCRATCH_MODELS.values():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageClassification.register(_config, _model, exist_ok=True)
